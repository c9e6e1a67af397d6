/**
 * The CLI as a demanding user probes it (issue 28): long prompts and command lines, chats on small
 * checkpoints, bad options, closed pipes. Each case failed before its fix.
 */
import Database from "better-sqlite3";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import sharp from "sharp";
import { describe, expect, it, vi } from "vitest";
import { Blip2, Blip2Processor, pipeline } from "../src/index.js";
import { Checkpoint } from "../src/io/checkpoint.js";
import { withDTypes } from "../src/quantize/quantize.js";
import { cli, cliWithInput, copyFixture, fixture } from "./helpers.js";

const MAIN = path.join(path.dirname(fixture()), "..", "src", "cli", "main.ts");

/** The CLI as a separate process (its own command line), with `input` on stdin. */
function cliProcess(argv: string[], input = ""): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", MAIN, ...argv], { stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c) => (stdout += c));
    child.stderr.on("data", (c) => (stderr += c));
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
    child.stdin.end(input);
  });
}

const oneLine = (stderr: string) => expect(stderr.trim().split("\n"), stderr).toHaveLength(1);

describe("long prompts and command lines", () => {
  it("a question of 30 kB on the command line is answered (ONNX Runtime's telemetry overflowed the worker's stack: exit 139)", async () => {
    // Spaces: the T5 tokenizer folds them, so the prompt is short and only the command line is long.
    const question = `what${" ".repeat(30_000)}is it?`;
    const r = await cliProcess(["ask", "-q", "-m", fixture("tiny-blip2-t5"), "--max-new-tokens", "3", "--json", fixture("image0.png"), question]);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).ids).toHaveLength(4);
  }, 60_000);

  it("T5 refuses a prompt beyond the 2048 positions blip2 gives its encoder, before running it", async () => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-t5"), "--prompt", "word ".repeat(1100), fixture("image0.png"));
    expect(r.code).toBe(1);
    oneLine(r.stderr);
    expect(r.stderr).toMatch(/prompt too long: 22\d\d prompt tokens \(image tokens included\) exceed the 2048 positions blip2 gives T5's encoder/);
  });

  it("T5 refuses more new tokens than its decoder's 2048 positions", async () => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-t5"), "--max-new-tokens", "2048", fixture("image0.png"));
    expect(r.code).toBe(1);
    oneLine(r.stderr);
    expect(r.stderr).toMatch(/2048 new tokens exceed the 2048 positions blip2 gives T5's decoder .*: at most 2047/);
  });

  it("OPT: new tokens that do not fit after the prompt are named as such, not as a prompt too long", async () => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), "--max-new-tokens", "200", fixture("image0.png"));
    expect(r.code).toBe(1);
    oneLine(r.stderr);
    expect(r.stderr).not.toMatch(/prompt too long/);
    expect(r.stderr).toMatch(/the prompt's 5 tokens \(image tokens included\) \+ 200 new tokens exceed the language model's 128 positions: at most 123 new tokens fit/);
  });

  it("a context window beyond the model's positions is refused before anything runs", async () => {
    const r = await cliWithInput(`${"why ".repeat(10_000)}\n`, "chat", "-m", fixture("tiny-blip2-t5"), "--context-window", "100000", fixture("image0.png"));
    expect(r.code).toBe(2);
    oneLine(r.stderr);
    expect(r.stderr).toMatch(/--context-window: this language model takes at most 2048 positions, got 100000/);
    const opt = await cliWithInput("hi\n", "chat", "-m", fixture("tiny-blip2-opt"), "--context-window", "512", fixture("image0.png"));
    expect(opt.code).toBe(2);
    expect(opt.stderr).toMatch(/at most 128 positions, got 512/);
  });
});

describe("blip2 chat", () => {
  it("on a checkpoint of 128 positions, 30 piped questions get 30 answers: the default window is the model's, old turns dropped", async () => {
    const questions = Array.from({ length: 30 }, (_, i) => `what is in picture ${i}?`).join("\n");
    const r = await cliWithInput(`${questions}\n`, "chat", "-m", fixture("tiny-blip2-opt"), "--max-new-tokens", "4", fixture("image0.png"));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim().split("\n")).toHaveLength(30);
    expect(r.stderr).not.toMatch(/error/);
    expect(r.stderr).toMatch(/left out the \d+ oldest turns to stay within the context window/);
  });

  it("a chat whose every question failed exits 1", async () => {
    const r = await cliWithInput(`${"why ".repeat(200)}\n${"how ".repeat(200)}\n`, "chat", "-m", fixture("tiny-blip2-opt"), "--max-new-tokens", "4", fixture("image0.png"));
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr.match(/does not fit the 128-token window/g)).toHaveLength(2);
  });

  it("commands are case-insensitive; an unknown one gets a hint and is not asked", async () => {
    const r = await cliWithInput("/foo\nwhat color is the circle?\n/RESET\n/Exit\nnever asked\n", "chat", "-m", fixture("tiny-blip2-opt"), "--max-new-tokens", "10", fixture("image0.png"));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim().split("\n")).toEqual(["::::::::::", "(conversation reset)"]);
    expect(r.stderr).toMatch(/^blip2: unknown command \/foo \(\/reset forgets the conversation, \/exit quits\)/);
  });
});

describe("usage errors exit 2, whichever option", () => {
  it.each([
    [["--dtype", "q7"], /invalid --dtype: expected one of .*, got "q7"/],
    [["--dtype", "eyes=q8"], /unknown part "eyes"/],
    [["--min-new-tokens", "50"], /minNewTokens \(50\) exceeds maxNewTokens \(20\)/],
    [["--num-return-sequences", "3"], /numReturnSequences \(3\) exceeds numBeams \(1\)/],
    [["--num-beams", "0"], /--num-beams: expected an integer >= 1/],
  ])("caption %j", async (flags, message) => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-opt"), ...(flags as string[]), fixture("image0.png"));
    expect(r.code, r.stderr).toBe(2);
    oneLine(r.stderr);
    expect(r.stderr).toMatch(message as RegExp);
  });

  it("quantize --dtype q7", async () => {
    const r = await cli("quantize", "-m", fixture("tiny-blip2-opt"), "--dtype", "q7", "--out", "/tmp/never-written");
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/expected one of .*, got "q7"/);
  });
});

describe("a retrieval checkpoint given to a generating command", () => {
  it("names the commands that use it", async () => {
    const r = await cli("caption", "-m", fixture("tiny-blip2-itm"), fixture("image0.png"));
    expect(r.code).toBe(1);
    oneLine(r.stderr);
    expect(r.stderr).toMatch(/is an image-text retrieval checkpoint, which cannot generate text: use it with 'blip2 match', 'blip2 index' and 'blip2 search'/);
    expect(r.stderr).not.toMatch(/load it with/);
  });
});

describe("a reader that closes the pipe early (| head)", () => {
  it("ends the command quietly with the status of SIGPIPE, not a stack trace", async () => {
    const images = ["image0.png", "image1.png", "image2.png", "image0.png", "image1.png"].map((f) => fixture(f));
    const r = await new Promise<{ code: number | null; stderr: string; got: string }>((resolve, reject) => {
      const child = spawn(process.execPath, ["--import", "tsx", MAIN, "caption", "--json", "-m", fixture("tiny-blip2-opt"), "--batch-size", "1", "--max-new-tokens", "3", ...images]);
      let stderr = "";
      let got = "";
      child.stderr.on("data", (c) => (stderr += c));
      // Like `head -c 10`: read the first bytes, then close the pipe while the command goes on.
      child.stdout.once("data", (c) => {
        got = String(c).slice(0, 10);
        child.stdout.destroy();
      });
      child.on("error", reject);
      child.on("close", (code) => resolve({ code, stderr, got }));
    });
    expect(r.got).toBe('{"image":"');
    expect(r.stderr).toBe("");
    expect(r.code).toBe(141);
  }, 60_000);
});

describe("blip2 index and search write only into blip2 indexes", () => {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-reliability-"));
  const photos = path.join(work, "photos");
  fs.mkdirSync(photos);
  fs.copyFileSync(fixture("image0.png"), path.join(photos, "a.png"));
  const model = fixture("tiny-blip2-itm");
  const sha = (file: string) => createHash("sha256").update(fs.readFileSync(file)).digest("hex");
  const siblings = (file: string) => fs.readdirSync(path.dirname(file)).filter((f) => f.startsWith(path.basename(file))).sort();

  /** Another program's database: its own `meta` (key, value) table and a `users` table. */
  function otherDatabase(name: string, tables: string): string {
    const file = path.join(work, name);
    const db = new Database(file);
    db.exec(tables);
    db.close();
    return file;
  }

  it.each([
    ["a users table", "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users (name) VALUES ('ada');", /tables blip2 does not make: users/],
    ["its own meta table", "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); INSERT INTO meta VALUES ('schema', '7');", /no images table/],
    ["blip2's tables, but not its rows", "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT, size INTEGER, mtime_ms REAL, sha256 TEXT, embedding BLOB);", /records no model/],
  ])("another program's database (%s) is refused by index and search, left byte for byte as it was", async (name, tables, why) => {
    const file = otherDatabase(`${name.replace(/\W+/g, "-")}.sqlite`, tables);
    const before = sha(file);
    for (const r of [await cli("index", "-m", model, photos, "--db", file), await cli("search", "--db", file, "x"), await cli("search", "-m", model, "--db", file, "x")]) {
      expect(r.code).toBe(1);
      oneLine(r.stderr);
      expect(r.stderr).toMatch(new RegExp(`${path.basename(file)}: not a blip2 index \\(.*\\); refusing to write into it`));
      expect(r.stderr).toMatch(why as RegExp);
    }
    expect(sha(file)).toBe(before);
    expect(siblings(file)).toEqual([path.basename(file)]);
  });

  it("an empty file and a file that is not SQLite are refused, and stay as they were", async () => {
    const empty = path.join(work, "empty.sqlite");
    fs.writeFileSync(empty, "");
    const text = path.join(work, "notes.sqlite");
    fs.writeFileSync(text, "my notes, not a database\n");
    for (const [file, what] of [[empty, "an empty file"], [text, "not an SQLite database"]] as const) {
      for (const r of [await cli("index", "-m", model, photos, "--db", file), await cli("search", "--db", file, "x")]) {
        expect(r.code).toBe(1);
        expect(r.stderr).toContain(`not a blip2 index (${what})`);
      }
    }
    expect(fs.readFileSync(empty, "utf8")).toBe("");
    expect(fs.readFileSync(text, "utf8")).toBe("my notes, not a database\n");
    const folder = await cli("search", "--db", photos, "x");
    expect(folder.code).toBe(1);
    expect(folder.stderr.trim()).toBe(`blip2: error: ${photos}: not a blip2 index (not a file); give the index's file as --db`);
  });

  it("search opens an index read-only: the database is not changed by it", async () => {
    const db = path.join(work, "index.sqlite");
    const built = await cli("index", "-m", model, photos, "--db", db, "--json");
    expect(built.code, built.stderr).toBe(0);
    const before = sha(db);
    const r = await cli("search", "--db", db, "a circle", "--json");
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout).path).toBe(path.join(photos, "a.png"));
    expect(sha(db)).toBe(before);
    // Beside it, the embeddings' matrix (blip2's own file) and what SQLite keeps for a read-only
    // reader of a database in WAL mode: an empty log.
    expect(siblings(db).filter((f) => !f.endsWith("-shm"))).toEqual(["index.sqlite", "index.sqlite-wal", "index.sqlite.itc"]);
    expect(fs.statSync(`${db}-wal`).size).toBe(0);
  });

  it("a file in the way of the embeddings' matrix is not overwritten", async () => {
    const db = path.join(work, "matrix.sqlite");
    expect((await cli("index", "-m", model, photos, "--db", db)).code).toBe(0);
    fs.writeFileSync(`${db}.itc`, "someone's file");
    const r = await cli("search", "--db", db, "x");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/matrix.sqlite.itc: a file blip2 did not write/);
    expect(fs.readFileSync(`${db}.itc`, "utf8")).toBe("someone's file");
  });
});

describe("blip2 index over awkward folders", () => {
  const model = fixture("tiny-blip2-itm");

  it("a symbolic link loop and a dangling link are skipped, counted and named; the rest is indexed", async () => {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-links-"));
    const photos = path.join(work, "photos");
    fs.mkdirSync(photos);
    fs.copyFileSync(fixture("image0.png"), path.join(photos, "a.png"));
    fs.symlinkSync("loop2.png", path.join(photos, "loop1.png"));
    fs.symlinkSync("loop1.png", path.join(photos, "loop2.png"));
    fs.symlinkSync("gone.png", path.join(photos, "dangling.png"));
    const r = await cli("index", "-m", model, photos, "--db", path.join(work, "i.sqlite"));
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`unreadable: ${path.join(photos, "dangling.png")}: a symbolic link to nothing`);
    expect(r.stderr).toContain(`unreadable: ${path.join(photos, "loop1.png")}: a symbolic link in a loop`);
    expect(r.stderr).toContain(`unreadable: ${path.join(photos, "loop2.png")}: a symbolic link in a loop`);
    expect(r.stdout).toMatch(/^1 images indexed .*: 1 new, .* 3 unreadable\n$/);
  });

  it("the counts do not depend on the batch size: copies within one batch reuse the first's embedding", async () => {
    const work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-copies-"));
    const photos = path.join(work, "photos");
    fs.mkdirSync(photos);
    for (const name of ["a.png", "b.png", "c.png"]) fs.copyFileSync(fixture("image0.png"), path.join(photos, name));
    fs.copyFileSync(fixture("image1.png"), path.join(photos, "d.png"));
    const reports = [];
    for (const batch of ["1", "8"]) {
      const r = await cli("index", "-m", model, photos, "--db", path.join(work, `batch${batch}.sqlite`), "--batch-size", batch, "--json");
      expect(r.code, r.stderr).toBe(0);
      reports.push(JSON.parse(r.stdout));
    }
    for (const report of reports) {
      expect(report.added.map((p: string) => path.basename(p))).toEqual(["a.png", "d.png"]);
      expect(report.reused.map((p: string) => path.basename(p))).toEqual(["b.png", "c.png"]);
    }
    const embeddings = (file: string) => new Database(file, { readonly: true }).prepare("SELECT path, embedding FROM images ORDER BY path").all();
    expect(embeddings(path.join(work, "batch8.sqlite"))).toEqual(embeddings(path.join(work, "batch1.sqlite")));
  });
});

describe("a phone photo stored sideways (EXIF orientation 6)", async () => {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-exif-"));
  // The photo turned a quarter anticlockwise and stored so, with orientation 6 to turn it back.
  const sideways = await sharp(fixture("photo640x427.jpg")).rotate(-90).raw().toBuffer({ resolveWithObject: true });
  const raw = { raw: { width: sideways.info.width, height: sideways.info.height, channels: 3 as const } };
  const phone = path.join(work, "phone.jpg");
  await sharp(sideways.data, raw).jpeg({ quality: 95 }).withMetadata({ orientation: 6 }).toFile(phone);
  const upright = path.join(work, "upright.png");
  await sharp(phone).rotate().png().toFile(upright);
  const model = fixture("tiny-blip2-opt");

  it("is captioned upright by the CLI", async () => {
    const caption = async (image: string) => JSON.parse((await cli("caption", "-m", model, "--json", "--max-new-tokens", "10", image)).stdout).ids;
    const stored = path.join(work, "stored.jpg");
    await sharp(sideways.data, raw).jpeg({ quality: 95 }).toFile(stored);
    expect(await caption(phone)).toEqual(await caption(upright));
    expect(await caption(stored)).not.toEqual(await caption(upright));
  });

  it("is seen upright by the Blip2 helpers and pipeline; Blip2Processor keeps transformers' processor's view unless asked", async () => {
    const blip2 = await Blip2.load(model);
    const captioner = await pipeline("image-to-text", model);
    try {
      const pixels = async (p: Blip2Processor, image: string) => (await p.process({ images: image })).pixelValues!;
      const reference = await pixels(blip2.processor, upright);
      expect(await pixels(blip2.processor, phone)).toEqual(reference);
      expect(await pixels(captioner.blip2.processor, phone)).toEqual(reference);
      expect(await pixels(await Blip2Processor.fromPretrained(model, { exifOrientation: true }), phone)).toEqual(reference);
      expect(await pixels(await Blip2Processor.fromPretrained(model), phone)).not.toEqual(reference);
      const asStored = await Blip2.load(model, { exifOrientation: false });
      await asStored.dispose();
      expect(await pixels(asStored.processor, phone)).not.toEqual(reference);
    } finally {
      await blip2.dispose();
      await captioner.dispose();
    }
  });
});

describe("a checkpoint whose config asks for fewer layers than its weights hold", () => {
  it("runs the config's layers and warns of the tensors it leaves unused", async () => {
    const dir = copyFixture("tiny-blip2-opt");
    const file = path.join(dir, "config.json");
    const config = JSON.parse(fs.readFileSync(file, "utf8"));
    config.text_config.num_hidden_layers = 1;
    fs.writeFileSync(file, JSON.stringify(config));
    const warn = vi.spyOn(console, "warn").mockImplementation(() => undefined);
    try {
      const r = await cli("caption", "-m", dir, "--max-new-tokens", "3", fixture("image0.png"));
      expect(r.code, r.stderr).toBe(0);
      const warnings = warn.mock.calls.map((c) => String(c[0]));
      expect(warnings.filter((w) => /not used/.test(w))).toEqual([
        `blip2: warning: ${dir}: the weights hold 2 layers under language_model.model.decoder.layers but config.json's text_config.num_hidden_layers is 1: 16 tensors of layers 1..1 are not used`,
      ]);
    } finally {
      warn.mockRestore();
    }
  });
});

describe("two processes converting the same checkpoint for the first time", () => {
  it("the conversion that comes second leaves the first's file in place (the packed copies' key has its time)", async () => {
    const ckpt = Checkpoint.open(fixture("tiny-blip2-opt"));
    const q8 = { vision: "q8", qformer: "q8", language: "q8" } as const;
    // The file another process writes: made beforehand in another cache, put in place while this
    // process converts the same part (after it has seen none there).
    const other = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-other-"));
    await withDTypes(ckpt, q8, { cacheDir: other });
    const theirs = (root: string) => fs.readdirSync(root, { recursive: true, encoding: "utf8" }).find((f) => f.endsWith("vision-q8.safetensors"))!;
    const relative = theirs(other);
    const cache = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-race-"));
    const converting = withDTypes(ckpt, q8, { cacheDir: cache });
    const target = path.join(cache, relative);
    fs.copyFileSync(path.join(other, relative), target);
    const placed = fs.statSync(target);
    const converted = await converting;
    const after = fs.statSync(target);
    expect([after.ino, after.mtimeMs]).toEqual([placed.ino, placed.mtimeMs]);
    const visionQ8 = converted.names().find((n) => n.startsWith("vision_model.") && n.endsWith(".q8.weight"))!;
    expect(path.resolve(converted.tensor(visionQ8).file)).toBe(path.resolve(target));
    // Nothing of this process's own conversion is left behind.
    expect(fs.readdirSync(path.dirname(target)).filter((f) => /\.tmp-\d+$/.test(f))).toEqual([]);
  });
});
