-- Sample data for the demo and the tests: a small shop with personal data worth protecting.
CREATE TABLE customers (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL UNIQUE,
    phone       text,
    card_number text,
    national_id text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers(id),
    total_cents int NOT NULL,
    status      text NOT NULL DEFAULT 'paid',
    placed_at   timestamptz NOT NULL DEFAULT now()
);

INSERT INTO customers (name, email, phone, card_number, national_id)
SELECT
    (ARRAY['Ada','Grace','Alan','Edsger','Barbara','Donald','Frances','Ken','Radia','Tim'])[1 + (i % 10)]
        || ' ' || (ARRAY['Lovelace','Hopper','Turing','Dijkstra','Liskov','Knuth','Allen','Thompson','Perlman','Berners-Lee'])[1 + ((i / 10) % 10)],
    'customer' || i || '@example.com',
    '+1-555-' || lpad((1000 + i)::text, 4, '0'),
    '4111 1111 1111 ' || lpad((i % 10000)::text, 4, '0'),
    lpad((100000000 + i * 7919)::text, 9, '0')
FROM generate_series(1, 200) AS i;

INSERT INTO orders (customer_id, total_cents, status, placed_at)
SELECT 1 + (i % 200), 500 + (i * 37) % 20000,
       (ARRAY['paid','shipped','refunded'])[1 + (i % 3)],
       now() - (i || ' hours')::interval
FROM generate_series(1, 1000) AS i;
