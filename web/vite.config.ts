// The page of `blip2 serve`, built into dist/web, which the server serves at /.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  // Relative asset URLs: the page works under any prefix a proxy puts it.
  base: "./",
  build: { outDir: fileURLToPath(new URL("../dist/web", import.meta.url)), emptyOutDir: true, target: "es2022" },
});
