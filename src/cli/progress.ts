/** Progress bars on stderr: drawn only on a terminal, and never with --quiet. */
import type { DownloadProgress } from "../hub/download.js";

export interface ProgressSink {
  download(p: DownloadProgress): void;
  /** `done` of `total` items (images) processed. */
  items(label: string, done: number, total: number): void;
  clear(): void;
}

const BAR = 24;

function bar(fraction: number): string {
  const filled = Math.round(Math.min(1, Math.max(0, fraction)) * BAR);
  return `[${"=".repeat(filled)}${" ".repeat(BAR - filled)}]`;
}

export function formatBytes(n: number): string {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let u = 0;
  while (n >= 1000 && u < units.length - 1) {
    n /= 1000;
    u++;
  }
  return `${n.toFixed(u ? 1 : 0)} ${units[u]}`;
}

export function progressSink(stream: NodeJS.WritableStream & { isTTY?: boolean }, quiet: boolean): ProgressSink {
  const enabled = !quiet && stream.isTTY === true;
  let drawn = false;
  const draw = (line: string) => {
    if (!enabled) return;
    stream.write(`\r${line.slice(0, 100).padEnd(100)}`);
    drawn = true;
  };
  const clear = () => {
    if (drawn) stream.write(`\r${" ".repeat(100)}\r`);
    drawn = false;
  };
  return {
    download: (p) => {
      draw(`${p.file.slice(-32).padEnd(32)} ${bar(p.total ? p.loaded / p.total : 0)} ${formatBytes(p.loaded)} / ${formatBytes(p.total)}`);
      if (p.done) clear();
    },
    items: (label, done, total) => {
      draw(`${label} ${bar(done / total)} ${done}/${total}`);
      if (done === total) clear();
    },
    clear,
  };
}
