#!/usr/bin/env python3
"""A batchd pull worker in plain Python (standard library only).

It claims items of a pull queue (long-polling), works on each one, renews the lease while it
works, writes progress to the item's timeline, and reports the result. The "work" here counts
the words of `input.text`; replace `work()` with your own.

    BATCHD_URL=http://127.0.0.1:8080 BATCHD_TOKEN=<worker key> python3 worker.py --queue remote

A 409 answer (`lease_lost` or `item_cancelled`) means: stop working on that item, its result
would be dropped.
"""

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone


class LeaseGone(Exception):
    """The item's lease is lost or its batch was cancelled: stop working on it."""


class Batchd:
    def __init__(self, url, token=None):
        self.url = url.rstrip("/")
        self.token = token

    def call(self, path, body, timeout=60):
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        if self.token:
            request.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            if error.code == 409:
                raise LeaseGone(json.load(error)["error"]["code"]) from None
            raise

    def claim(self, queue, max_items=1, wait_ms=10000):
        body = {"max_items": max_items, "wait_ms": wait_ms}
        return self.call("/v1/queues/%s/claim" % queue, body, timeout=wait_ms / 1000 + 30)["items"]

    def item(self, item, action, **fields):
        fields["lease_token"] = item["lease_token"]
        return self.call("/v1/items/%s/%s" % (item["id"], action), fields)


class Heartbeat(threading.Thread):
    """Renews an item's lease every third of its length until stopped or the lease is gone."""

    def __init__(self, batchd, item, every):
        super().__init__(daemon=True)
        self.batchd, self.item, self.every = batchd, item, every
        self.stopped = threading.Event()
        self.gone = threading.Event()

    def run(self):
        while not self.stopped.wait(self.every):
            try:
                self.batchd.item(self.item, "heartbeat")
            except LeaseGone:
                self.gone.set()
                return
            except OSError as error:
                print("heartbeat failed, retrying: %s" % error, file=sys.stderr)


def work(batchd, item):
    """The job itself: count the words of input.text."""
    text = (item["input"] or {}).get("text", "")
    batchd.item(item, "events", type="step", step="count")
    return {"words": len(text.split())}


def lease_seconds(item):
    """Seconds left on the lease: `lease_expires_at` is RFC 3339 UTC, 2026-01-31T12:00:30.1234Z."""
    stamp = item["lease_expires_at"].replace("+00:00", "").rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    expires = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    expires += timedelta(seconds=float("0." + (fraction or "0")))
    return max((expires - datetime.now(timezone.utc)).total_seconds(), 0.3)


def run_one(batchd, item):
    beat = Heartbeat(batchd, item, lease_seconds(item) / 3)
    beat.start()
    try:
        result = work(batchd, item)
        if beat.gone.is_set():
            return
        batchd.item(item, "complete", result=result)
    except LeaseGone as gone:
        print("item %s: %s, dropped" % (item["id"], gone), file=sys.stderr)
    except Exception as error:  # the job failed: report it, retryable
        try:
            batchd.item(item, "fail", error=str(error), retryable=True)
        except LeaseGone:
            pass
    finally:
        beat.stopped.set()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--wait-ms", type=int, default=10000)
    parser.add_argument("--exit-when-idle", action="store_true", help="exit after a claim finds nothing")
    args = parser.parse_args()
    batchd = Batchd(os.environ.get("BATCHD_URL", "http://127.0.0.1:8080"), os.environ.get("BATCHD_TOKEN"))
    wait_ms = 200 if args.exit_when_idle else args.wait_ms
    while True:
        items = batchd.claim(args.queue, max_items=10, wait_ms=wait_ms)
        if not items and args.exit_when_idle:
            return
        for item in items:
            run_one(batchd, item)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
