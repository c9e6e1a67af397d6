/**
 * Errors that reach the user. Every failure the user can cause (a missing file, a bad config,
 * an unreadable image) is a Blip2Error whose message is one line naming the file and the problem;
 * the CLI prints that line and exits non-zero, never a stack trace.
 */
export class Blip2Error extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "Blip2Error";
  }
}

/** A short, single-line description of any thrown value. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message.split("\n")[0] ?? String(err);
  return String(err);
}

/** A checkpoint of another architecture than the one asked for (`architecture`: what it is), so that a caller can name its own way to use it. */
export class ArchitectureError extends Blip2Error {
  constructor(
    message: string,
    readonly architecture: string,
  ) {
    super(message);
    this.name = "ArchitectureError";
  }
}
