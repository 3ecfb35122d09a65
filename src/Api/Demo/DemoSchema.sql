-- The demo API's own tables (orders, payments, and the payment gateway stand-in's charges).
-- Applied by the API on start; every statement is idempotent.
CREATE TABLE IF NOT EXISTS demo_orders
(
    id text PRIMARY KEY,
    user_id text NOT NULL,
    request_key text,
    customer_id text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    items jsonb NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS demo_orders_user ON demo_orders (user_id, created_at);

CREATE TABLE IF NOT EXISTS demo_charges
(
    id text PRIMARY KEY,
    user_id text NOT NULL,
    order_id text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS demo_charges_user ON demo_charges (user_id);

CREATE TABLE IF NOT EXISTS demo_payments
(
    id text PRIMARY KEY,
    user_id text NOT NULL,
    request_key text,
    amount numeric(12, 2) NOT NULL,
    currency text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS demo_payments_user ON demo_payments (user_id, created_at);
