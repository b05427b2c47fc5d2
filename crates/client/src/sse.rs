//! An incremental parser of Server-Sent Events (the WHATWG `text/event-stream` format): bytes
//! go in as they arrive, whole events come out. A line or a UTF-8 character may be split
//! across chunks, lines may end in `\n`, `\r\n` or `\r` (even a `\r` at the end of one chunk
//! and its `\n` at the start of the next), lines starting with `:` are comments (keep-alives),
//! and several `data:` lines join with `\n`.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The last `id:` seen on the stream so far (it carries over to later events, as in a
    /// browser's `lastEventId`).
    pub(crate) id: Option<String>,
    /// The `event:` field; `None` means the default type, `message`.
    pub(crate) event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub(crate) data: String,
}

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    /// The bytes of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` that starts the next one ends no new line.
    skip_lf: bool,
    /// The first line has been seen (a byte-order mark may only precede it).
    past_first_line: bool,
    last_id: Option<String>,
    event: Option<String>,
    /// Each `data:` value followed by `\n`, as the format defines it.
    data: String,
}

const BOM: &[u8] = "\u{feff}".as_bytes();

impl SseParser {
    /// Feeds the next chunk of the stream; returns the events it completed, in order.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut rest = chunk;
        if self.skip_lf && !rest.is_empty() {
            self.skip_lf = false;
            if let [b'\n', tail @ ..] = rest {
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|b| matches!(b, b'\n' | b'\r')) {
            self.line.extend_from_slice(&rest[..end]);
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, &mut frames);
            let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
            if rest[end] == b'\r' && end + 1 == rest.len() {
                // Its `\n`, if any, comes with the next chunk.
                self.skip_lf = true;
            }
            rest = &rest[end + 1 + usize::from(crlf)..];
        }
        self.line.extend_from_slice(rest);
        frames
    }

    fn process_line(&mut self, line: &[u8], frames: &mut Vec<Frame>) {
        let line = if self.past_first_line {
            line
        } else {
            self.past_first_line = true;
            line.strip_prefix(BOM).unwrap_or(line)
        };
        if line.is_empty() {
            self.dispatch(frames);
            return;
        }
        if line.starts_with(b":") {
            return;
        }
        // Decoded only once the whole line is here, so a character split across chunks is
        // whole again.
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            // An id with a NUL is ignored, as browsers do.
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            // `retry:` sets a browser's reconnection delay; this client does not reconnect by
            // itself. Unknown fields are ignored by the format's rules.
            _ => {}
        }
    }

    /// A blank line ends an event; one without data is dropped (its id still counts).
    fn dispatch(&mut self, frames: &mut Vec<Frame>) {
        let event = self.event.take();
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        frames.push(Frame {
            id: self.last_id.clone(),
            event,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: Option<&str>, event: Option<&str>, data: &str) -> Frame {
        Frame {
            id: id.map(str::to_owned),
            event: event.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    fn parse_whole(input: &[u8]) -> Vec<Frame> {
        SseParser::default().feed(input)
    }

    /// Feeds `input` in pieces of `size` bytes.
    fn parse_in_chunks(input: &[u8], size: usize) -> Vec<Frame> {
        let mut parser = SseParser::default();
        input.chunks(size).flat_map(|chunk| parser.feed(chunk)).collect()
    }

    /// Feeds `input` split at every pair of positions: every way a frame can be cut in three.
    fn assert_same_under_every_split(input: &[u8], expected: &[Frame]) {
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let mut parser = SseParser::default();
                let mut frames = parser.feed(&input[..i]);
                frames.extend(parser.feed(&input[i..j]));
                frames.extend(parser.feed(&input[j..]));
                assert_eq!(
                    frames,
                    expected,
                    "split at {i} and {j} of {:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn one_frame_with_id_event_and_data() {
        let frames = parse_whole(b"id: 7\nevent: item.completed\ndata: {\"seq\":7}\n\n");
        assert_eq!(frames, vec![frame(Some("7"), Some("item.completed"), "{\"seq\":7}")]);
    }

    #[test]
    fn several_frames_in_one_chunk_come_out_in_order() {
        let input = b"id: 1\nevent: a\ndata: one\n\nid: 2\nevent: b\ndata: two\n\nid: 3\nevent: c\ndata: three\n\n";
        let frames = parse_whole(input);
        assert_eq!(
            frames,
            vec![
                frame(Some("1"), Some("a"), "one"),
                frame(Some("2"), Some("b"), "two"),
                frame(Some("3"), Some("c"), "three"),
            ]
        );
    }

    #[test]
    fn a_frame_split_anywhere_parses_the_same() {
        let input = "id: 12\nevent: item.step\ndata: {\"step\":\"é→✓\"}\n\n: ping\n\nid: 13\ndata: x\n\n".as_bytes();
        let expected = vec![
            frame(Some("12"), Some("item.step"), "{\"step\":\"é→✓\"}"),
            frame(Some("13"), None, "x"),
        ];
        assert_same_under_every_split(input, &expected);
        for size in 1..input.len() {
            assert_eq!(parse_in_chunks(input, size), expected, "chunks of {size}");
        }
    }

    #[test]
    fn a_partial_frame_waits_for_its_blank_line() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"id: 1\nevent: a\ndata: on").is_empty());
        assert!(parser.feed(b"e\n").is_empty(), "no blank line yet");
        assert_eq!(parser.feed(b"\n"), vec![frame(Some("1"), Some("a"), "one")]);
    }

    #[test]
    fn an_unfinished_frame_at_the_end_is_never_dispatched() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"id: 1\ndata: half\n").is_empty());
        // The stream ends here: nothing was dispatched, which is what the format asks.
    }

    #[test]
    fn comments_and_keep_alives_are_skipped() {
        let input = b": keep-alive\n\n:\n\nid: 1\n: a comment inside a frame\ndata: x\n\n: bye\n";
        assert_eq!(parse_whole(input), vec![frame(Some("1"), None, "x")]);
    }

    #[test]
    fn multi_line_data_joins_with_newlines() {
        let input = b"data: {\ndata:   \"a\": 1\ndata: }\n\n";
        assert_eq!(parse_whole(input), vec![frame(None, None, "{\n  \"a\": 1\n}")]);
    }

    #[test]
    fn only_one_space_after_the_colon_is_removed() {
        let input = b"data:no space\n\ndata:  two spaces\n\ndata\n\ndata:\n\n";
        assert_eq!(
            parse_whole(input),
            vec![
                frame(None, None, "no space"),
                frame(None, None, " two spaces"),
                frame(None, None, ""),
                frame(None, None, ""),
            ]
        );
    }

    #[test]
    fn a_value_may_hold_colons() {
        let input = b"event: item.log\ndata: {\"at\":\"2026-01-31T12:00:00Z\"}\n\n";
        assert_eq!(
            parse_whole(input),
            vec![frame(None, Some("item.log"), "{\"at\":\"2026-01-31T12:00:00Z\"}")]
        );
    }

    #[test]
    fn crlf_and_lone_cr_end_lines_too() {
        let expected = vec![frame(Some("1"), Some("a"), "x"), frame(Some("2"), None, "y")];
        for input in [
            &b"id: 1\r\nevent: a\r\ndata: x\r\n\r\nid: 2\r\ndata: y\r\n\r\n"[..],
            &b"id: 1\revent: a\rdata: x\r\rid: 2\rdata: y\r\r"[..],
            &b"id: 1\nevent: a\r\ndata: x\r\rid: 2\ndata: y\r\n\n"[..],
        ] {
            assert_same_under_every_split(input, &expected);
        }
    }

    #[test]
    fn a_cr_at_the_end_of_a_chunk_and_lf_at_the_start_of_the_next_are_one_line_end() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"data: x\r").is_empty());
        assert!(
            parser.feed(b"\n").is_empty(),
            "the \\n belongs to the \\r: no blank line"
        );
        assert_eq!(parser.feed(b"\r\n"), vec![frame(None, None, "x")]);
    }

    #[test]
    fn frames_without_data_are_dropped_but_their_id_carries_over() {
        let input = b"id: 4\nevent: nothing\n\ndata: later\n\n";
        assert_eq!(parse_whole(input), vec![frame(Some("4"), None, "later")]);
    }

    #[test]
    fn the_event_type_does_not_carry_over() {
        let input = b"event: a\ndata: 1\n\ndata: 2\n\n";
        assert_eq!(
            parse_whole(input),
            vec![frame(None, Some("a"), "1"), frame(None, None, "2")]
        );
    }

    #[test]
    fn an_id_with_nul_is_ignored_and_an_empty_id_resets() {
        let input = b"id: 1\ndata: a\n\nid: 2\0x\ndata: b\n\nid\ndata: c\n\n";
        assert_eq!(
            parse_whole(input),
            vec![
                frame(Some("1"), None, "a"),
                frame(Some("1"), None, "b"),
                frame(Some(""), None, "c"),
            ]
        );
    }

    #[test]
    fn retry_and_unknown_fields_are_ignored() {
        let input = b"retry: 3000\nfoo: bar\nid: 1\ndata: x\n\n";
        assert_eq!(parse_whole(input), vec![frame(Some("1"), None, "x")]);
    }

    #[test]
    fn a_leading_byte_order_mark_is_dropped_even_when_split() {
        let input = "\u{feff}data: x\n\n".as_bytes();
        assert_same_under_every_split(input, &[frame(None, None, "x")]);
        // Only at the very start: later it is part of a field name, so the line is ignored.
        let later = "data: a\n\n\u{feff}data: b\n\n".as_bytes();
        assert_eq!(parse_whole(later), vec![frame(None, None, "a")]);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let frames = parse_whole(b"data: \xff\xfe ok\n\n");
        assert_eq!(frames, vec![frame(None, None, "\u{fffd}\u{fffd} ok")]);
    }

    #[test]
    fn an_empty_chunk_changes_nothing() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"").is_empty());
        assert!(parser.feed(b"data: x\r").is_empty());
        assert!(parser.feed(b"").is_empty());
        assert!(parser.feed(b"\n").is_empty());
        assert_eq!(parser.feed(b"\n"), vec![frame(None, None, "x")]);
    }
}
