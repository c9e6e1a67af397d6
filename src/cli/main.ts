#!/usr/bin/env node
import { run } from "./run.js";

// A reader that stops early (`| head`) closes the pipe: the next write fails with EPIPE. End then,
// quietly and with the status of a process that SIGPIPE ended (128 + 13), as Unix tools do, rather
// than with the stack trace of an unhandled error event and whichever code the race left.
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (err: NodeJS.ErrnoException) => {
    if (err.code === "EPIPE") process.exit(141);
    throw err;
  });
}

process.exitCode = await run(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr, stdin: process.stdin });
