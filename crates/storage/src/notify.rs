//! Wake-ups. A change that makes work claimable, changes a batch's control state or appends
//! events publishes a `Notice`; executors and event streams wait on them instead of polling.
//! On PostgreSQL notices travel as NOTIFY (so every instance sees them), on SQLite through an
//! in-process channel.

use tokio::sync::broadcast;

/// The name of the PostgreSQL channel.
pub(crate) const CHANNEL: &str = "batchd";

/// Something changed that a waiter may care about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Notice {
    /// Items of this queue may have become claimable.
    Work { queue: String },
    /// A batch was paused, resumed or cancelled: running items should look at it.
    Control { batch_id: String },
    /// Events were appended to a batch's timeline.
    Events { batch_id: String },
    /// A queue was paused or resumed.
    Queue { queue: String },
    /// Webhook deliveries were written: a dispatcher should look for due ones.
    Webhooks,
    /// Notices may have been missed (the PostgreSQL listener reconnected): every waiter
    /// should look again.
    Resync,
}

impl Notice {
    /// The compact payload sent over NOTIFY.
    pub(crate) fn encode(&self) -> String {
        match self {
            Notice::Work { queue } => format!("w:{queue}"),
            Notice::Control { batch_id } => format!("c:{batch_id}"),
            Notice::Events { batch_id } => format!("e:{batch_id}"),
            Notice::Queue { queue } => format!("q:{queue}"),
            Notice::Webhooks => "h:".to_owned(),
            Notice::Resync => "r:".to_owned(),
        }
    }

    pub(crate) fn decode(payload: &str) -> Option<Self> {
        let (kind, rest) = payload.split_once(':')?;
        let rest = rest.to_owned();
        Some(match kind {
            "w" => Notice::Work { queue: rest },
            "c" => Notice::Control { batch_id: rest },
            "e" => Notice::Events { batch_id: rest },
            "q" => Notice::Queue { queue: rest },
            "h" => Notice::Webhooks,
            "r" => Notice::Resync,
            _ => return None,
        })
    }
}

/// The local fan-out of notices to every subscriber of this process.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    tx: broadcast::Sender<Notice>,
}

impl Notifier {
    pub(crate) fn new() -> Self {
        Self {
            tx: broadcast::channel(4096).0,
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.tx.subscribe()
    }

    pub(crate) fn publish_resync(&self) {
        self.publish([Notice::Resync]);
    }

    pub(crate) fn publish(&self, notices: impl IntoIterator<Item = Notice>) {
        for notice in notices {
            // No subscriber is fine: nobody is waiting.
            let _ = self.tx.send(notice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_through_their_payload() {
        for n in [
            Notice::Work { queue: "q.1".into() },
            Notice::Control { batch_id: "a:b".into() },
            Notice::Events { batch_id: "x".into() },
            Notice::Queue {
                queue: "default".into(),
            },
            Notice::Webhooks,
            Notice::Resync,
        ] {
            assert_eq!(Notice::decode(&n.encode()), Some(n));
        }
        assert_eq!(Notice::decode("zz"), None);
    }
}
