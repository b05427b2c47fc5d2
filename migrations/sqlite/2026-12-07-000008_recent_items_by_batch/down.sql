CREATE INDEX items_tenant_created ON items (tenant, created_at, seq);
