// A scripted session through the gateway with the Node.js pg driver: TLS (verified against the
// gateway's CA) and SCRAM-SHA-256. Prints one JSON object with what each step saw.
import fs from "node:fs";
import pg from "pg";

const cfg = JSON.parse(process.argv[2]);
const client = new pg.Client({
  host: cfg.host, port: cfg.port, user: cfg.user, password: cfg.password, database: cfg.database,
  application_name: cfg.application_name,
  ssl: { ca: fs.readFileSync(cfg.ca, "utf8"), rejectUnauthorized: true },
});
const out = {};
const refused = async (key, sql) => {
  try { await client.query(sql); out[key] = null; } catch (e) { out[key] = { code: e.code, message: e.message }; }
};
await client.connect();
out.tls = client.connection.stream.encrypted === true;
out.count = (await client.query("select count(*)::int as n from customers")).rows[0].n;
out.param = (await client.query("select id, email, card_number from customers where id = $1", [7])).rows[0];
for (let i = 1; i <= 3; i++) {  // a named prepared statement, parsed once and executed three times
  const r = await client.query({ name: "by_id", text: "select id, status from orders where id = $1", values: [i] });
  (out.prepared ??= []).push(r.rows[0]);
}
await refused("denied", "delete from orders");
await refused("derived", "select upper(card_number) from customers where id = 1");
await refused("error", "select 1/0");
await client.query("begin");
out.update = (await client.query("update orders set total_cents = total_cents where id = $1", [1])).rowCount;
await client.query("rollback");
out.after = (await client.query("select 1 as one")).rows[0].one;
await client.end();
console.log(JSON.stringify(out));
