-- The fuzz suite's extra table (after the demo set): one column of each type the API's
-- OpenAPI document types, so that generated filters and bodies reach every conversion.
CREATE TABLE kinds (
    id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    small     smallint,
    medium    integer,
    big       bigint NOT NULL DEFAULT 0,
    amount    numeric(10,2),
    ratio     double precision,
    flag      boolean,
    code      varchar(8),
    initials  char(3),
    note      text,
    day       date,
    at        timestamp,
    at_tz     timestamptz,
    doc       jsonb,
    raw       json,
    tags      text[],
    scores    integer[],
    doubled   numeric GENERATED ALWAYS AS (big::numeric * 2) STORED
);

-- A table without a primary key.
CREATE TABLE events (
    happened_at timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL,
    payload     jsonb
);
