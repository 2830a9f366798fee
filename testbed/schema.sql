-- baileys-dr test bed: the application's PostgreSQL auth-state schema.
--
-- This is the schema the Baileys service writes (shared DOMAIN.md section 1),
-- reproduced so that the db image, the throwaway local cluster and pytest all
-- run against the same tables. It is idempotent: applying it twice is a no-op.
-- It creates no roles and holds no passwords; run it as the owner of the
-- target database (e.g. `psql -v ON_ERROR_STOP=1 -d baileys -f schema.sql`).

-- Keeps updated_at current on every UPDATE (both tables use it).
CREATE OR REPLACE FUNCTION update_updated_at_column()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$;

-- One row per company (tenant): its Baileys credentials.
CREATE TABLE IF NOT EXISTS whatsapp_auth (
    company_id TEXT PRIMARY KEY,
    creds      JSONB NOT NULL,
    created_at TIMESTAMPTZ DEFAULT now(),
    updated_at TIMESTAMPTZ DEFAULT now()
);

-- The Signal-protocol key store. expires_at is set by the application
-- (7 or 14 days ahead) and is NOT a safe deletion signal.
CREATE TABLE IF NOT EXISTS whatsapp_keys (
    company_id TEXT NOT NULL,
    key_type   TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    value      JSONB NOT NULL,
    created_at TIMESTAMPTZ DEFAULT now(),
    updated_at TIMESTAMPTZ DEFAULT now(),
    expires_at TIMESTAMPTZ NULL,
    PRIMARY KEY (company_id, key_type, key_id)
);

CREATE INDEX IF NOT EXISTS idx_whatsapp_keys_company_id
    ON whatsapp_keys (company_id);
CREATE INDEX IF NOT EXISTS idx_whatsapp_keys_key_type
    ON whatsapp_keys (key_type);
CREATE INDEX IF NOT EXISTS idx_whatsapp_keys_type_company
    ON whatsapp_keys (key_type, company_id);
CREATE INDEX IF NOT EXISTS idx_whatsapp_keys_expires_at
    ON whatsapp_keys (expires_at)
    WHERE expires_at IS NOT NULL;

-- BEFORE UPDATE triggers. Created only when missing (works on any PostgreSQL
-- version, unlike CREATE OR REPLACE TRIGGER, and takes no lock when present).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgname = 'update_whatsapp_auth_updated_at'
          AND tgrelid = 'whatsapp_auth'::regclass
    ) THEN
        CREATE TRIGGER update_whatsapp_auth_updated_at
            BEFORE UPDATE ON whatsapp_auth
            FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();
    END IF;

    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgname = 'update_whatsapp_keys_updated_at'
          AND tgrelid = 'whatsapp_keys'::regclass
    ) THEN
        CREATE TRIGGER update_whatsapp_keys_updated_at
            BEFORE UPDATE ON whatsapp_keys
            FOR EACH ROW EXECUTE FUNCTION update_updated_at_column();
    END IF;
END;
$$;
