// The official OpenAI Node SDK, unchanged, streaming a completion from multipole-server.
// usage: node openai_sdk.mjs BASE_URL   (the `openai` package installed beside this script)
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "test-key" });
const stream = await client.completions.create({
  model: "multipole", prompt: "The license", max_tokens: 12, temperature: 0.9, seed: 5,
  stream: true, stream_options: { include_usage: true },
});
let text = "", usage = null, finish = null, events = 0;
for await (const chunk of stream) {
  events++;
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    text += c.text;
    if (c.finish_reason) finish = c.finish_reason;
  }
}
const plain = await client.completions.create({
  model: "multipole", prompt: "The license", max_tokens: 12, temperature: 0.9, seed: 5,
});
const ok = text === plain.choices[0].text && usage?.completion_tokens === 12 && finish === "length" &&
           events >= 12;
console.log(JSON.stringify({ events, text, usage, finish, plain: plain.choices[0].text, ok }));
process.exit(ok ? 0 : 1);
