/**
 * The page of `blip2 serve` in a real browser: Playwright (playwright-core) drives Debian's
 * Chromium (`.ci/run` installs it with apt; CHROMIUM_PATH names another). An image is picked, its
 * caption is the CLI's, a chat's answer streams in token by token, a search shows thumbnails; the
 * page works from the keyboard and at a phone's width. Screenshots are kept in test-artifacts/.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium, type Browser, type Page } from "playwright-core";
import { build } from "vite";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Blip2ForImageTextRetrieval } from "../src/api/retrieval.js";
import { Blip2 } from "../src/api/tasks.js";
import { openStore, type ImageStore } from "../src/search/store.js";
import { createServer } from "../src/serve/server.js";
import { cli, cliWithInput, fixture } from "./helpers.js";

const ROOT = path.resolve(import.meta.dirname, "..");
const ARTIFACTS = path.join(ROOT, "test-artifacts");
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const OPT = fixture("tiny-blip2-opt");
const ITM = fixture("tiny-blip2-itm");
const IMAGE = fixture("image1.png");

let work: string;
let db: string;
let blip2: Blip2;
let retrieval: Blip2ForImageTextRetrieval;
let store: ImageStore;
let url: string;
let stop: () => Promise<void>;
let browser: Browser;

beforeAll(async () => {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: install Debian's (apt-get install chromium, as .ci/run does) or set CHROMIUM_PATH`);
  work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-page-"));
  // The page as `npm run build` makes it, built afresh so that the test sees the sources.
  const webRoot = path.join(work, "web");
  await build({ configFile: path.join(ROOT, "web/vite.config.ts"), build: { outDir: webRoot, emptyOutDir: true }, logLevel: "silent" });
  const photos = path.join(work, "photos");
  fs.mkdirSync(photos);
  for (const f of ["image0.png", "image1.png", "image2.png"]) fs.copyFileSync(fixture(f), path.join(photos, f));
  db = path.join(work, "index.sqlite");
  expect((await cli("index", "-m", ITM, photos, "--db", db, "-q")).code).toBe(0);
  blip2 = await Blip2.load(OPT);
  retrieval = await Blip2ForImageTextRetrieval.fromPretrained(ITM);
  store = await openStore(db, null, false);
  const app = await createServer({ blip2, retrieval, store, modelName: "tiny-blip2-opt", retrievalName: "tiny-blip2-itm", webRoot });
  url = await app.listen({ host: "127.0.0.1", port: 0 });
  stop = () => app.close();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
});

afterAll(async () => {
  await browser?.close();
  await stop?.();
  await store?.close();
  await retrieval?.dispose();
  await blip2?.dispose();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

/** Counts the changes to an element's text from now on (a streamed answer changes it token by token). */
async function watch(page: Page, selector: string): Promise<() => Promise<number>> {
  await page.evaluate((s) => {
    const w = window as unknown as { changes: number };
    w.changes = 0;
    new MutationObserver((records) => (w.changes += records.length)).observe(document.querySelector(s)!, { subtree: true, childList: true, characterData: true });
  }, selector);
  return () => page.evaluate(() => (window as unknown as { changes: number }).changes);
}

describe("the web page", () => {
  it("captions a picked image as the CLI does, chats with streaming, searches with thumbnails", async () => {
    const [expected] = (await cli("caption", "-m", OPT, "--json", "-q", IMAGE)).stdout.trim().split("\n").map((l) => JSON.parse(l));
    const chatAnswer = (await cliWithInput("what is it?\n", "chat", "-m", OPT, "-q", IMAGE)).stdout.split("\n")[0];
    const searched = (await cli("search", "--db", db, "--json", "-q", "a red circle")).stdout.trim().split("\n").map((l) => JSON.parse(l));

    const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
    await page.goto(url);
    await expect.poll(() => page.textContent("#model")).toContain("tiny-blip2-opt (fp32");
    await page.setInputFiles("#file", IMAGE);
    await expect.poll(() => page.getAttribute("#preview", "src")).toMatch(/^data:image\/png;base64,/);

    await page.click("#caption-form button[type=submit]");
    await expect.poll(() => page.textContent("#caption")).toBe(expected.caption);

    const changes = await watch(page, "#chat-log");
    await page.fill("#chat-input", "what is it?");
    await page.press("#chat-input", "Enter");
    await expect.poll(() => page.textContent("#chat-log li:nth-child(2) span:nth-child(2)")).toBe(chatAnswer);
    expect(await page.textContent("#chat-log li:nth-child(1)")).toBe("You: what is it?");
    // Token by token: the answer's text changed many times, not once.
    expect(await changes()).toBeGreaterThan(5);

    await page.fill("#search-text", "a red circle");
    await page.press("#search-text", "Enter");
    await expect.poll(() => page.locator("#results li").count()).toBe(3);
    const names = await page.locator("#results figcaption").allTextContents();
    expect(names.map((n) => n.replace(/ \(.*\)$/, ""))).toEqual(searched.map((h: { path: string }) => path.basename(h.path)));
    await expect.poll(() => page.locator("#results img").evaluateAll((imgs) => imgs.every((i) => (i as HTMLImageElement).naturalWidth > 0))).toBe(true);
    expect(await page.textContent("#status")).toBe("");
    await page.screenshot({ path: path.join(ARTIFACTS, "serve-page.png"), fullPage: true });
    await page.close();
  });

  it("works from the keyboard and fits a phone's width", async () => {
    const page = await browser.newPage({ viewport: { width: 375, height: 800 }, isMobile: true });
    await page.goto(url);
    const reached: string[] = [];
    for (let i = 0; i < 12; i++) {
      await page.keyboard.press("Tab");
      reached.push(await page.evaluate(() => document.activeElement?.id ?? ""));
    }
    for (const id of ["drop", "prompt", "question", "chat-input", "search-text"]) expect(reached).toContain(id);
    // A question without an image says so instead of failing silently.
    await page.fill("#question", "what?");
    await page.press("#question", "Enter");
    await expect.poll(() => page.textContent("#status")).toMatch(/choose an image first/);
    expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(375);
    await page.screenshot({ path: path.join(ARTIFACTS, "serve-page-phone.png"), fullPage: true });
    await page.close();
  });
});
