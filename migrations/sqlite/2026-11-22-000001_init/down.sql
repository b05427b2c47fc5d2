DROP TABLE queue_states;
DROP TABLE webhook_attempts;
DROP TABLE webhook_deliveries;
DROP TABLE events;
DROP TABLE items;
DROP TABLE batches;
