import fs from "node:fs";
import path from "node:path";

/**
 * Files are written under a partial name, `<file>.tmp-<pid>`, and renamed into place when complete:
 * readers never see half a file, and one left by a killed writer names the process that wrote it.
 */
export const partialFile = (file: string) => `${file}.tmp-${process.pid}`;

/** The pid of the process writing a partial file, from its name (0 for any other name). */
export const partialFileWriter = (name: string) => Number(/\.tmp-(\d+)$/.exec(name)?.[1] ?? 0);

/** For a partial file or folder: whether the process writing it still runs; null for any other name. */
export function partialWriterAlive(name: string): boolean | null {
  const pid = partialFileWriter(name);
  if (pid === 0) return null;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** A partial file or folder whose writer was killed (its process is gone). */
export const abandonedPartial = (name: string) => partialWriterAlive(name) === false;

/** Bytes of a file, or of everything in a folder. */
export function bytesOf(p: string): number {
  const s = fs.statSync(p);
  return s.isDirectory() ? fs.readdirSync(p).reduce((sum, f) => sum + bytesOf(path.join(p, f)), 0) : s.size;
}

/**
 * Removes the partial files and folders in `folder` left by writers that were killed (a
 * `.tmp-<pid>` whose process is gone): each can be gigabytes. Those of a writer still running in
 * another process stay.
 */
export function removeAbandonedFiles(folder: string): { path: string; bytes: number }[] {
  const gone = fs.readdirSync(folder).filter(abandonedPartial).map((f) => path.join(folder, f));
  return gone.map((p) => {
    const bytes = bytesOf(p);
    fs.rmSync(p, { recursive: true, force: true });
    return { path: p, bytes };
  });
}
