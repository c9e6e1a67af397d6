/**
 * The open chats of a server, by id. A chat holds its image's features and a key/value cache, so
 * one left idle for `ttlMs` is closed and its memory freed; at most `maxChats` are open at once.
 */
import { randomUUID } from "node:crypto";
import type { Chat } from "../api/tasks.js";
import { HttpError } from "./errors.js";

interface Open {
  chat: Chat;
  lastUsed: number;
}

export class ChatStore {
  private readonly chats = new Map<string, Open>();
  private readonly sweeper: NodeJS.Timeout;

  constructor(
    private readonly ttlMs: number,
    private readonly maxChats: number,
    private readonly onCount: (n: number) => void = () => {},
  ) {
    // Checked a few times per lifetime, so a chat lives at most a fraction longer than its ttl.
    this.sweeper = setInterval(() => void this.expire(), Math.max(50, Math.min(ttlMs / 4, 60_000)));
    this.sweeper.unref();
  }

  get size(): number {
    return this.chats.size;
  }

  /** Refuses a new chat while `maxChats` are open (checked before the image is encoded). */
  checkRoom(): void {
    if (this.chats.size >= this.maxChats) {
      throw new HttpError(429, "too_many_chats", `${this.chats.size} chats are open (the limit): delete one (DELETE /v1/chats/{id}) or wait for idle ones to expire`, { "retry-after": String(Math.ceil(this.ttlMs / 1000)) });
    }
  }

  add(chat: Chat): string {
    this.checkRoom();
    const id = `chat_${randomUUID()}`;
    this.chats.set(id, { chat, lastUsed: Date.now() });
    this.onCount(this.chats.size);
    return id;
  }

  get(id: string): Chat {
    const open = this.chats.get(id);
    if (!open) throw new HttpError(404, "chat_not_found", `no chat ${JSON.stringify(id)} (it was deleted, expired after ${Math.round(this.ttlMs / 1000)} s idle, or never existed)`);
    open.lastUsed = Date.now();
    return open.chat;
  }

  async delete(id: string): Promise<void> {
    const chat = this.get(id);
    this.chats.delete(id);
    this.onCount(this.chats.size);
    await chat.dispose();
  }

  /** Closes the chats idle for longer than the ttl. */
  async expire(now = Date.now()): Promise<string[]> {
    const idle = [...this.chats].filter(([, o]) => now - o.lastUsed > this.ttlMs).map(([id]) => id);
    await Promise.all(idle.map((id) => this.delete(id).catch(() => undefined)));
    return idle;
  }

  async close(): Promise<void> {
    clearInterval(this.sweeper);
    await Promise.all([...this.chats.keys()].map((id) => this.delete(id).catch(() => undefined)));
  }
}
