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
