// The official `openai` npm package as a chatq client: create in background, poll, stream,
// resume. Run by test_openai_node.py with OPENAI_NODE_HOME (where scripts/setup-node put the
// package), CHATQ_URL and CHATQ_KEY; prints one JSON summary on stdout for the test to check.
"use strict";
const { createRequire } = require("node:module");
const requireSdk = createRequire(`${process.env.OPENAI_NODE_HOME}/package.json`);
const OpenAI = requireSdk("openai");

async function main() {
  const client = new OpenAI({ baseURL: `${process.env.CHATQ_URL}/v1`,
                              apiKey: process.env.CHATQ_KEY || "none", maxRetries: 0 });
  const tag = Math.random().toString(16).slice(2);
  const created = await client.responses.create({ model: "chatq-sim-1",
                                                  input: `from node ${tag}`, background: true });
  let polled = created;
  for (let i = 0; i < 400 && !["completed", "failed", "cancelled", "incomplete"].includes(polled.status); i++) {
    await new Promise((r) => setTimeout(r, 100));
    polled = await client.responses.retrieve(created.id);
  }
  const events = [];
  const stream = await client.responses.create({ model: "chatq-sim-1", input: `stream ${tag} llmsim:itl_ms=120 llmsim:tokens=15`,
                                                 background: true, stream: true });
  for await (const event of stream) {
    events.push(event);
    if (events.filter((e) => e.type === "response.output_text.delta").length === 3) break;
  }
  const rid = events[0].response.id;
  const rest = [];
  const resumed = await client.responses.retrieve(rid, {
    stream: true, starting_after: events[events.length - 1].sequence_number });
  for await (const event of resumed) rest.push(event);
  let notFound = null;
  try {
    await client.responses.retrieve("resp_0123456789abcdef");
  } catch (err) {
    notFound = { name: err.constructor.name, status: err.status, code: err.code };
  }
  const all = events.concat(rest);
  console.log(JSON.stringify({
    created: { id: created.id, status: created.status, background: created.background },
    polled: { status: polled.status, text: polled.output_text, usage: polled.usage },
    stream: { types: all.map((e) => e.type), seqs: all.map((e) => e.sequence_number),
              text: all.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join(""),
              final: rest.length ? rest[rest.length - 1].response.output[0].content[0].text : null },
    notFound,
  }));
}

main().catch((err) => { console.error(err); process.exit(1); });
