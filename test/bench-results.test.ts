/** Benchmark runs are kept as JSON lines in bench/results/<date>-<machine>.jsonl, with their date, machine, command and commit. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { machineName, recordResult } from "../scripts/bench-results.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "blip2-bench-results-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe("bench results", () => {
  it("names a machine by its CPU model and core count", () => {
    expect(machineName("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", 2)).toBe("intel-xeon-platinum-8481c-2-cores");
    expect(machineName("AMD EPYC 7B13", 2)).toBe("amd-epyc-7b13-2-cores");
    expect(machineName("", 16)).toBe("unknown-cpu-16-cores");
  });

  it("appends one line per run to the file of the day and machine, never overwriting", () => {
    const now = new Date("2026-12-02T10:11:12Z");
    const argv = [path.resolve(import.meta.dirname, "../scripts/bench.ts"), "--model", "opt-2.7b", "--dtypes", "q8", "--dir", "/tmp/elsewhere"];
    const first = recordResult({ bench: "blip2", results: [{ dtype: "q8", perToken: { median: 0.13 } }] }, { dir, now, argv });
    const second = recordResult({ bench: "blip2", results: [] }, { dir, now, argv });
    expect(second).toBe(first);
    expect(path.basename(first)).toBe(`2026-12-02-${machineName()}.jsonl`);
    const lines = fs.readFileSync(first, "utf8").trimEnd().split("\n").map((l) => JSON.parse(l));
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatchObject({
      date: "2026-12-02T10:11:12.000Z",
      machine: { cpu: os.cpus()[0]!.model, cores: os.cpus().length, name: machineName() },
      command: "node --import tsx scripts/bench.ts --model opt-2.7b --dtypes q8 --dir /tmp/elsewhere",
      bench: "blip2",
      results: [{ dtype: "q8", perToken: { median: 0.13 } }],
    });
    expect(lines[0].commit).toMatch(/^[0-9a-f]{12}(\+changes)?$/);
  });

  it("starts a new file on another day", () => {
    const file = recordResult({ bench: "search" }, { dir, now: new Date("2026-12-03T00:00:01Z"), argv: ["scripts/bench-search.ts"] });
    expect(path.basename(file)).toBe(`2026-12-03-${machineName()}.jsonl`);
    expect(fs.readFileSync(file, "utf8").split("\n").filter(Boolean)).toHaveLength(1);
  });
});
