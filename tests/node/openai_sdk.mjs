// The official OpenAI Node SDK, unchanged, against multipole-server: completions and chat
// completions, streaming and not, each stream equal to its non-streaming twin (same seed).
// usage: node openai_sdk.mjs BASE_URL   (the `openai` package installed beside this script)
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "test-key" });
const results = {};

// Completions.
{
  // ignore_eos: the random model may sample EOS early, and 12 tokens ending "length" are asserted.
  const args = {
    model: "multipole", prompt: "The license", max_tokens: 12, temperature: 0.9, seed: 5,
    ignore_eos: true,
  };
  const stream = await client.completions.create({
    ...args, stream: true, stream_options: { include_usage: true },
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
  const plain = await client.completions.create(args);
  results.completions = {
    events, text, usage, finish, plain: plain.choices[0].text,
    ok: text === plain.choices[0].text && usage?.completion_tokens === 12 && finish === "length" &&
        events >= 12,
  };
}

// Chat completions.
{
  const args = {
    model: "multipole",
    messages: [{ role: "system", content: "You answer briefly." },
               { role: "user", content: "What is the license?" }],
    max_tokens: 12, temperature: 0.9, seed: 5, ignore_eos: true,
  };
  const plain = await client.chat.completions.create(args);
  const message = plain.choices[0].message;
  const stream = await client.chat.completions.create({
    ...args, stream: true, stream_options: { include_usage: true },
  });
  let text = "", role = null, usage = null, finish = null, events = 0;
  for await (const chunk of stream) {
    events++;
    if (chunk.object !== "chat.completion.chunk") throw new Error(`chunk object ${chunk.object}`);
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      text += c.delta.content ?? "";
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  // The SDK's stream helper assembles the same message.
  const runner = client.beta.chat.completions.stream({ ...args, stream: true });
  const assembled = await runner.finalChatCompletion();
  results.chat = {
    events, text, role, usage, finish, plain: message.content,
    assembled: assembled.choices[0].message.content,
    ok: plain.object === "chat.completion" && message.role === "assistant" &&
        text === message.content && role === "assistant" && finish === plain.choices[0].finish_reason &&
        usage?.completion_tokens === plain.usage.completion_tokens &&
        usage?.prompt_tokens === plain.usage.prompt_tokens && events >= 2 &&
        assembled.choices[0].message.content === message.content,
  };
}

const ok = results.completions.ok && results.chat.ok;
console.log(JSON.stringify({ ...results, ok }));
process.exit(ok ? 0 : 1);
