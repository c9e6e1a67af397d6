/** The worker thread that hosts ONNX Runtime sessions and caches for runtime/session.ts. */
import { parentPort } from "node:worker_threads";
import { describeError } from "../errors.js";
import { collectGarbage } from "./gc.js";
import { buffersOf, fromWire, SessionHost, toWire } from "./sessionHost.js";

const host = new SessionHost();

parentPort!.on("message", async (m) => {
  try {
    let result: unknown = null;
    let transfer: ArrayBuffer[] = [];
    switch (m.op) {
      case "create":
        await host.create(m.id, m.name, m.model, m.options);
        break;
      case "run": {
        const out = toWire(await host.run(m.id, fromWire(m.feeds), m.step));
        result = out;
        // Outputs are fresh buffers: handed over, not copied.
        transfer = buffersOf(out);
        break;
      }
      case "runIntoCache":
        await host.runIntoCache(m.id, fromWire(m.feeds), m.cache);
        break;
      case "release":
        await host.release(m.id);
        break;
      case "newCache":
        host.newCache(m.id, m.shape);
        break;
      case "resizeCache":
        host.resizeCache(m.id, m.capacity, m.keep);
        // A kept cache's next generation starts: the last one's garbage goes now (the cache moved
        // within its block, or the old block went back to the host's CacheMemory).
        collectGarbage();
        break;
      case "composeCache":
        host.composeCache(m.id, m.rows, m.capacity, m.length);
        break;
      case "reorderCache":
        host.reorderCache(m.id, m.index, m.shared);
        break;
      case "dropCache":
        host.dropCache(m.id);
        // The generation is over: free its garbage now (see gc.ts).
        collectGarbage();
        break;
    }
    parentPort!.postMessage({ seq: m.seq, result }, transfer);
  } catch (err) {
    parentPort!.postMessage({ seq: m.seq, error: describeError(err) });
  }
});
