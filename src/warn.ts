/** Warnings for the user, each printed once per process (on stderr). */
const seen = new Set<string>();

export function warnOnce(message: string): void {
  if (seen.has(message)) return;
  seen.add(message);
  console.warn(`blip2: warning: ${message}`);
}
