/**
 * V8's full collection, callable without `--expose-gc`: the flag is set just long enough to fetch
 * the function (as jest's leak detector does). The worker thread that runs the sessions calls it
 * after each generation, whose garbage is large buffers (its key/value cache and every run's
 * outputs) that V8 would otherwise free only when it gets to them, raising the peak over a series
 * of captions. That thread's heap holds little else, so a collection is quick.
 */
import v8 from "node:v8";
import vm from "node:vm";

export const collectGarbage = ((): (() => void) => {
  try {
    v8.setFlagsFromString("--expose-gc");
    return vm.runInNewContext("gc") as () => void;
  } catch {
    // A runtime that refuses the flag only loses the early collection.
    return () => {};
  } finally {
    v8.setFlagsFromString("--no-expose-gc");
  }
})();
