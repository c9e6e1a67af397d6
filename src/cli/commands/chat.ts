/** `blip2 chat`: a conversation about one image, one question per line (a terminal or a pipe). */
import readline from "node:readline";
import { Blip2Error, describeError } from "../../errors.js";
import { intOption, numberOption, UsageError, type Command } from "../command.js";
import { generationFromArgs, generationHelp, generationOptionSpec, loadModel, modelHelp, modelOptions } from "../shared.js";

export const chat: Command = {
  name: "chat",
  summary: "chat about an image (type a question per line; /reset, /exit)",
  usage: "blip2 chat [--model M] [--context-window N] [--drop-to X] [generation options] IMAGE",
  help: [
    "--context-window N       tokens the language model may see (default 512)",
    "--drop-to X              when old turns must go, drop them until X of the window is used (default 1)",
    ...generationHelp,
    ...modelHelp,
  ].join("\n"),
  options: { ...modelOptions, ...generationOptionSpec, "context-window": { type: "string" }, "drop-to": { type: "string" } },
  async run(args, io) {
    if (args.positionals.length !== 1) throw new UsageError("chat: give exactly one IMAGE");
    const generation = generationFromArgs(args);
    const interactive = io.stdin.isTTY === true;
    const { blip2 } = await loadModel(args, io);
    try {
      const conversation = await blip2.chat(args.positionals[0]!, {
        contextWindow: intOption(args, "context-window", 8),
        dropTo: numberOption(args, "drop-to", (x) => x > 0 && x <= 1, "a share of the window in (0, 1]"),
        onDrop: (n) => io.stderr.write(`(left out the ${n} oldest turn${n > 1 ? "s" : ""} to stay within the context window)\n`),
      });
      const lines = readline.createInterface({ input: io.stdin, output: interactive ? io.stdout : undefined, terminal: interactive });
      if (interactive) io.stdout.write("Ask about the image. /reset forgets the conversation, /exit quits.\n> ");
      for await (const raw of lines) {
        const line = raw.trim();
        if (line === "/exit" || line === "/quit") break;
        if (line === "/reset") {
          conversation.reset();
          io.stdout.write("(conversation reset)\n");
        } else if (line) {
          try {
            io.stdout.write(`${(await conversation.ask(line, generation)).answer}\n`);
          } catch (err) {
            // A question that cannot fit is reported, and the conversation goes on.
            if (!(err instanceof Blip2Error)) throw err;
            io.stderr.write(`blip2: error: ${describeError(err)}\n`);
          }
        }
        if (interactive) io.stdout.write("> ");
      }
      lines.close();
    } finally {
      await blip2.dispose();
    }
    return 0;
  },
};
