-- `GET /v1/items` lists a tenant's recent items through their batches: an item is created
-- with its batch, so `batches_tenant_created` (or `batches_created`) finds the batches created
-- since the given time, in order, and `items_index_unique` their items. The index of items'
-- own on (tenant, created_at, seq) was written on every item insert for that listing alone.
DROP INDEX items_tenant_created;
