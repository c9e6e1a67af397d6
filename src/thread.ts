/** Starting this package's worker threads, from the built JavaScript or from the TypeScript sources. */
import { Worker } from "node:worker_threads";

/**
 * A worker running the module `name` (without extension) beside the module at `caller` (its
 * `import.meta.url`). From the TypeScript sources (tests, tsx) the worker loads it through tsx.
 */
export function startWorker(caller: string, name: string): Worker {
  const here = new URL(caller);
  if (here.pathname.endsWith(".ts")) {
    const entry = new URL(`./${name}.ts`, here).href;
    return new Worker(`import("tsx/esm/api").then((tsx) => { tsx.register(); return import(${JSON.stringify(entry)}); });`, { eval: true });
  }
  return new Worker(new URL(`./${name}.js`, here));
}
