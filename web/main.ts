/**
 * The page of `blip2 serve`: one image (dropped, pasted or picked), then a caption, an answer, a
 * chat whose answers stream in token by token, and a search of the server's index. It talks to
 * the same JSON API as any client.
 */
const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

let image: string | null = null;
let chatId: string | null = null;

function headers(json = true): Record<string, string> {
  const key = $<HTMLInputElement>("api-key").value.trim();
  return { ...(json ? { "content-type": "application/json" } : {}), ...(key ? { authorization: `Bearer ${key}` } : {}) };
}

function say(message: string): void {
  $("status").textContent = message;
}

/** A failed response's message (the API's errors are `{ error: { code, message } }`). */
async function failure(response: Response): Promise<Error> {
  const body = await response.json().catch(() => null);
  if (response.status === 401) $<HTMLDetailsElement>("api-key").closest("details")!.open = true;
  return new Error(body?.error?.message ?? `HTTP ${response.status}`);
}

async function call<T>(path: string, body?: unknown, method = "POST"): Promise<T> {
  const response = await fetch(path, { method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? (undefined as T) : ((await response.json()) as T);
}

/** POSTs `body` and reads the answer's server-sent events: `token` ones as they come, then the `done` one. */
async function stream<T>(path: string, body: object, onToken: (text: string) => void): Promise<T> {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok || !response.body) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = /^event: (.*)$/m.exec(block)?.[1];
      const data = JSON.parse(/^data: (.*)$/m.exec(block)?.[1] ?? "null");
      if (event === "token") onToken(data.text);
      else if (event === "done") return data as T;
      else if (event === "error") throw new Error(data.error.message);
    }
  }
  throw new Error("the answer ended early");
}

/** Runs `task` with `form`'s buttons disabled, reporting its error. */
async function busy(form: HTMLFormElement, task: () => Promise<void>): Promise<void> {
  const buttons = [...form.querySelectorAll("button")];
  buttons.forEach((b) => (b.disabled = true));
  say("");
  try {
    await task();
  } catch (err) {
    say((err as Error).message);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

function needImage(): string {
  if (!image) throw new Error("choose an image first (drop, paste or pick one)");
  return image;
}

function useFile(file: File | null | undefined): void {
  if (!file || !file.type.startsWith("image/")) return say("that is not an image");
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result as string;
    const preview = $<HTMLImageElement>("preview");
    preview.src = image;
    preview.alt = `the chosen image, ${file.name}`;
    preview.hidden = false;
    void resetChat();
    say("");
  };
  reader.readAsDataURL(file);
}

function setUpImage(): void {
  const drop = $("drop");
  const file = $<HTMLInputElement>("file");
  file.addEventListener("change", () => useFile(file.files?.[0]));
  drop.addEventListener("click", () => file.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      file.click();
    }
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer?.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items ?? [])].find((i) => i.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });
}

function onSubmit(id: string, task: (form: HTMLFormElement) => Promise<void>): void {
  const form = $<HTMLFormElement>(id);
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    void busy(form, () => task(form));
  });
}

async function resetChat(): Promise<void> {
  const old = chatId;
  chatId = null;
  $("chat-log").replaceChildren();
  if (old) await call(`/v1/chats/${old}`, undefined, "DELETE").catch(() => undefined);
}

function chatLine(who: "you" | "blip2", text: string): HTMLElement {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.className = who;
  name.textContent = who === "you" ? "You: " : "BLIP-2: ";
  const words = document.createElement("span");
  words.textContent = text;
  li.append(name, words);
  $("chat-log").append(li);
  return words;
}

async function showResults(results: { path: string; score: number; thumbnail: string }[]): Promise<void> {
  const list = $("results");
  list.replaceChildren();
  for (const r of results) {
    const li = document.createElement("li");
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    const name = r.path.split(/[\\/]/).pop() ?? r.path;
    img.alt = name;
    // Fetched rather than linked, so that an API key goes with it.
    const response = await fetch(r.thumbnail, { headers: headers(false) });
    if (response.ok) img.src = URL.createObjectURL(await response.blob());
    const caption = document.createElement("figcaption");
    caption.textContent = `${name} (${r.score.toFixed(3)})`;
    figure.append(img, caption);
    li.append(figure);
    list.append(li);
  }
  if (!results.length) list.textContent = "no results";
}

async function showModel(): Promise<void> {
  try {
    const h = await call<{ model: string | null; dtype: string; retrieval_model: string | null; tokens_per_second: number | null; indexed_images: number | null }>("/health", undefined, "GET");
    const speed = h.tokens_per_second ? `, ${h.tokens_per_second.toFixed(1)} tokens/s` : "";
    const index = h.indexed_images !== null ? ` · index: ${h.indexed_images} images` : "";
    $("model").textContent = `${h.model ?? "no captioning model"} (${h.dtype}${speed})${index}`;
    $("search-form").closest("section")!.hidden = h.indexed_images === null;
  } catch (err) {
    $("model").textContent = (err as Error).message;
  }
}

setUpImage();
onSubmit("caption-form", async () => {
  const prompt = $<HTMLInputElement>("prompt").value;
  const out = $("caption");
  out.textContent = "";
  const r = await stream<{ text: string }>("/v1/caption", { image: needImage(), ...(prompt ? { prompt } : {}) }, (t) => (out.textContent += t));
  out.textContent = r.text;
  void showModel();
});
onSubmit("ask-form", async () => {
  const out = $("answer");
  out.textContent = "";
  const r = await stream<{ text: string }>("/v1/ask", { image: needImage(), question: $<HTMLInputElement>("question").value }, (t) => (out.textContent += t));
  out.textContent = r.text;
});
onSubmit("chat-form", async () => {
  const input = $<HTMLInputElement>("chat-input");
  const content = input.value.trim();
  if (!content) return;
  chatId ??= (await call<{ id: string }>("/v1/chats", { image: needImage() })).id;
  chatLine("you", content);
  input.value = "";
  const words = chatLine("blip2", "");
  const r = await stream<{ answer: string }>(`/v1/chats/${chatId}/messages`, { content }, (t) => (words.textContent += t));
  words.textContent = r.answer;
  void showModel();
});
$("chat-reset").addEventListener("click", () => void resetChat());
onSubmit("search-form", async () => {
  const r = await call<{ results: { path: string; score: number; thumbnail: string }[] }>("/v1/search", { text: $<HTMLInputElement>("search-text").value, k: 12 });
  await showResults(r.results);
});
void showModel();
setInterval(() => void showModel(), 10_000);
