-- OrleansIdempotency's schema for Orleans' ADO.NET grain storage on PostgreSQL.
--
-- The provider reads its four queries from OrleansQuery (by key) and binds, by name, the parameters
-- GrainIdHash, GrainIdN0, GrainIdN1, GrainTypeHash, GrainTypeString, GrainIdExtensionString, ServiceId,
-- GrainStateVersion and PayloadBinary. Reads must return the columns PayloadBinary and Version; writes return
-- NewGrainStateVersion, and no row, NULL or the old version means the ETag check failed. That is the whole
-- contract: the table behind it is ours.
--
-- Differences from the upstream script, and why:
--  * a primary key on the grain's identity, so a first write is a plain INSERT .. ON CONFLICT DO NOTHING:
--    of two activations racing to claim the same new key, exactly one row is inserted (the fence of DESIGN §3);
--  * ExpiresAt, read from the payload's header (see IdempotencyStorageSerializer), so expired records
--    can be purged with an index range scan and storage stays bounded;
--  * a new row starts at a random version, not 1: after a purge deletes a row and another activation inserts it
--    again, a stale activation still holding the old row's ETag cannot match the new row by chance (ABA);
--  * a write is refused (as a version conflict) once the time in its payload header has passed: a claim that
--    reaches the server after its lease ended, its caller long gone, must not land (see below);
--  * the write is one PL/pgSQL function (OrleansStorage_Write, below), the other queries one statement each; Npgsql
--    prepares them all.
--
-- Needs Orleans 10.2.2 or later, whose provider treats "no row" and NULL as a version conflict. The queries carry
-- the marker OrleansIdempotency so that the installer can tell them from another application's.
--
-- Applied by the silo on every start, under an advisory lock; every statement is idempotent. The write query's text
-- carries the schema's version (below; raise it with any change here): a silo finding a newer one installed leaves
-- it as it is, so that an older silo restarting during a rolling upgrade, or its rollback, does not put its own
-- functions back under the newer silos (they share them).

CREATE TABLE IF NOT EXISTS OrleansQuery
(
    QueryKey varchar(64) NOT NULL PRIMARY KEY,
    QueryText varchar(8000) NOT NULL
);

CREATE TABLE IF NOT EXISTS OrleansStorage
(
    GrainIdHash integer NOT NULL,
    GrainTypeHash integer NOT NULL,
    ServiceId text NOT NULL,
    GrainTypeString text NOT NULL,
    GrainIdN0 bigint NOT NULL,
    GrainIdN1 bigint NOT NULL,
    -- '' stands for "no string key" so that the column can be part of the key.
    GrainIdExtensionString text NOT NULL,
    PayloadBinary bytea,
    Version integer NOT NULL,
    ModifiedOn timestamptz NOT NULL,
    ExpiresAt timestamptz NOT NULL,
    CONSTRAINT OrleansStorage_Key PRIMARY KEY
        (GrainIdHash, GrainTypeHash, ServiceId, GrainTypeString, GrainIdN0, GrainIdN1, GrainIdExtensionString)
);

-- Only when missing: CREATE INDEX IF NOT EXISTS locks the table before it finds the index there, and every silo's
-- start would then queue all writes behind that lock while anything else (a purge, a VACUUM) held the table.
DO $$
BEGIN
    IF to_regclass('orleansstorage_expiresat') IS NULL THEN
        CREATE INDEX IF NOT EXISTS OrleansStorage_ExpiresAt ON OrleansStorage (ExpiresAt);
    END IF;
END
$$;

-- The payload starts with two big-endian times in milliseconds since the Unix epoch (IdempotencyStorageSerializer;
-- a format byte follows them, which PostgreSQL does not read):
-- when the record may be purged (its expiry, or a longer claim's lease end), and the time after which the write must
-- not land (a claim's lease end: a claim that reaches the server after its caller gave up is refused instead of
-- leaving the key "outcome unknown").
CREATE OR REPLACE FUNCTION OrleansStorage_PayloadExpiresAt(payload bytea) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN length(payload) < 8 THEN 'infinity'::timestamptz
        ELSE to_timestamp((('x' || encode(substring(payload FROM 1 FOR 8), 'hex'))::bit(64)::bigint) / 1000.0)
    END
$$;

-- Compared as bytes (big-endian, so byte order is time order): far cheaper than decoding it, on every write.
-- Neither function is STRICT: PostgreSQL inlines a SQL function into the statement only if it is not (or its body
-- is strict too), and a function call per write cost about 15 % of the write's throughput (measured with pgbench).
CREATE OR REPLACE FUNCTION OrleansStorage_PayloadValidNow(payload bytea) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT length(payload) < 16 OR substring(payload FROM 9 FOR 8) > int8send((extract(epoch FROM now()) * 1000)::bigint)
$$;

-- The same by the clock as it is when called, not as it was when the statement began.
CREATE OR REPLACE FUNCTION OrleansStorage_PayloadValidStill(payload bytea) RETURNS boolean
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT length(payload) < 16 OR substring(payload FROM 9 FOR 8) > int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint)
$$;

-- The write: a create (no ETag: insert unless the key exists) or an update (only of the version the grain holds), and
-- neither once the payload's valid-until time has passed. NULL means refused, which the provider reports as a version
-- conflict. A function, so that the query text the provider sends is short: under multiplexing Npgsql parses and
-- rewrites the text of every command it executes, and the two-branch statement this replaces (1,900 characters) cost
-- the API process more CPU and allocation than anything else per write. PL/pgSQL keeps each branch's plan per
-- connection, so PostgreSQL plans no more than it did for the prepared statement (pgbench: as fast or faster).
CREATE OR REPLACE FUNCTION OrleansStorage_Write(
    grain_id_hash integer, grain_type_hash integer, service_id text, grain_type text, grain_id_n0 bigint,
    grain_id_n1 bigint, grain_id_extension text, expected_version integer, payload bytea) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    written integer;
BEGIN
    -- IS NOT TRUE, not NOT: a NULL payload is refused, as the statement this replaces refused it.
    IF OrleansStorage_PayloadValidNow(payload) IS NOT TRUE THEN
        RETURN NULL;
    END IF;

    IF expected_version IS NULL THEN
        INSERT INTO OrleansStorage (GrainIdHash, GrainTypeHash, ServiceId, GrainTypeString, GrainIdN0, GrainIdN1,
                                    GrainIdExtensionString, PayloadBinary, Version, ModifiedOn, ExpiresAt)
        VALUES (grain_id_hash, grain_type_hash, service_id, grain_type, grain_id_n0, grain_id_n1,
                coalesce(grain_id_extension, ''), payload, (floor(random() * 1000000000))::integer + 1, now(),
                OrleansStorage_PayloadExpiresAt(payload))
        ON CONFLICT ON CONSTRAINT OrleansStorage_Key DO NOTHING
        RETURNING Version INTO written;
    ELSE
        UPDATE OrleansStorage
        SET PayloadBinary = payload,
            Version = Version + 1,
            ModifiedOn = now(),
            ExpiresAt = OrleansStorage_PayloadExpiresAt(payload)
        WHERE GrainIdHash = grain_id_hash AND GrainTypeHash = grain_type_hash
          AND ServiceId = service_id AND GrainTypeString = grain_type
          AND GrainIdN0 = grain_id_n0 AND GrainIdN1 = grain_id_n1
          AND GrainIdExtensionString = coalesce(grain_id_extension, '')
          AND Version = expected_version
        RETURNING Version INTO written;
    END IF;

    -- Asked again once the row is written: a write that began in time but then waited on a lock (a VACUUM FULL, a
    -- REINDEX, a schema change) past its valid-until time must not land. Its caller gave up on it long ago (its
    -- client's timeout does not reach a statement waiting here), and a claim landing after its lease would leave the
    -- key "outcome unknown" although nothing ran. Raising rolls the write back.
    IF written IS NOT NULL AND OrleansStorage_PayloadValidStill(payload) IS NOT TRUE THEN
        RAISE EXCEPTION 'OrleansIdempotency: a write that waited past its valid-until time was not stored';
    END IF;

    RETURN written;
END
$$;

INSERT INTO OrleansQuery (QueryKey, QueryText) VALUES
('WriteToStorageKey', '/* OrleansIdempotency schema 2 */ SELECT OrleansStorage_Write(@GrainIdHash, @GrainTypeHash, @ServiceId, @GrainTypeString, @GrainIdN0, @GrainIdN1, @GrainIdExtensionString::text, @GrainStateVersion::integer, @PayloadBinary) AS NewGrainStateVersion'),
('ReadFromStorageKey', '
SELECT PayloadBinary, Version
FROM OrleansStorage
WHERE GrainIdHash = @GrainIdHash AND GrainTypeHash = @GrainTypeHash
  AND ServiceId = @ServiceId AND GrainTypeString = @GrainTypeString
  AND GrainIdN0 = @GrainIdN0 AND GrainIdN1 = @GrainIdN1
  AND GrainIdExtensionString = coalesce(@GrainIdExtensionString::text, '''')
'),
('ClearStorageKey', '
UPDATE OrleansStorage
SET PayloadBinary = NULL, Version = Version + 1, ModifiedOn = now()
WHERE GrainIdHash = @GrainIdHash AND GrainTypeHash = @GrainTypeHash
  AND ServiceId = @ServiceId AND GrainTypeString = @GrainTypeString
  AND GrainIdN0 = @GrainIdN0 AND GrainIdN1 = @GrainIdN1
  AND GrainIdExtensionString = coalesce(@GrainIdExtensionString::text, '''')
  AND Version = @GrainStateVersion::integer
RETURNING Version AS NewGrainStateVersion
'),
('DeleteStorageKey', '
DELETE FROM OrleansStorage
WHERE GrainIdHash = @GrainIdHash AND GrainTypeHash = @GrainTypeHash
  AND ServiceId = @ServiceId AND GrainTypeString = @GrainTypeString
  AND GrainIdN0 = @GrainIdN0 AND GrainIdN1 = @GrainIdN1
  AND GrainIdExtensionString = coalesce(@GrainIdExtensionString::text, '''')
  AND Version = @GrainStateVersion::integer
RETURNING Version + 1 AS NewGrainStateVersion
')
ON CONFLICT (QueryKey) DO UPDATE SET QueryText = excluded.QueryText;
