'use strict';
// One Pipeline stream, shared by every call on its connection: each request goes out with an
// id of its own, and each response is handed to the call waiting on that id, in whatever
// order the server answers.
//
// At most `maxInFlight` requests are in flight on a stream at once; a call past that waits
// for a place (within its deadline). A call whose deadline passes unregisters its id, so its
// late response is dropped. When the stream ends, every call still waiting fails with an
// `Ended`, which says whether the server promised that none of them was applied (its drain
// on shutdown).

const { status: Code } = require('@grpc/grpc-js');
const { LEADER_HEADER } = require('./router');

/** The stream ended with calls in flight: why, and whether the server applied none of them. */
class Ended extends Error {
  constructor(why, unapplied) {
    super(why);
    this.unapplied = unapplied;
  }
}

/** The request never left (the stream had ended): it may go out on another connection. */
class NotSent extends Error {}

class Pipe {
  /**
   * Opens a stream on `stub`; resolves once sessiond answers with its response headers
   * (within `openTimeoutMs`), or rejects with the grpc-js error.
   */
  static open(stub, metadata, maxInFlight, openTimeoutMs) {
    return new Promise((resolve, reject) => {
      const call = stub.Pipeline(metadata);
      const pipe = new Pipe(call, maxInFlight);
      let settled = false;
      const timer = setTimeout(() => {
        if (settled) return;
        settled = true;
        call.cancel();
        reject(Object.assign(new Error('no reply to opening a Pipeline stream'), {
          code: Code.DEADLINE_EXCEEDED,
          details: 'no reply to opening a Pipeline stream',
        }));
      }, openTimeoutMs);
      timer.unref();
      call.on('metadata', (md) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        const [leader] = md.get(LEADER_HEADER);
        pipe.leader = leader === undefined ? null : String(leader);
        resolve(pipe);
      });
      call.on('error', (err) => {
        if (!settled) {
          settled = true;
          clearTimeout(timer);
          reject(err);
        }
        pipe._end(err);
      });
      call.on('status', (s) => pipe._end(s));
      call.on('end', () => pipe._end({ code: Code.OK, details: 'the Pipeline stream ended' }));
      call.on('data', (r) => pipe._answer(r));
    });
  }

  constructor(call, maxInFlight) {
    this._call = call;
    this._waiting = new Map();
    this._nextId = 0n;
    this._free = maxInFlight;
    this._queue = [];
    this.ended = null;
    /** The leader the stream's response headers named, if any. */
    this.leader = null;
  }

  /** Whether the stream still takes calls. */
  get open() {
    return this.ended === null;
  }

  /** Ends the stream (closing the client). */
  close() {
    this._call.end();
    this._call.cancel();
  }

  /**
   * Sends `op` (a PipelineRequest's oneof, such as `{get: {...}}`) and resolves with the
   * PipelineResponse. Rejects with NotSent if it never left, with Ended if the stream ended
   * while it was in flight, and with `signal.reason` once `signal` aborts.
   */
  async call(op, signal) {
    await this._place(signal);
    try {
      if (this.ended) throw new NotSent(this.ended.message);
      const id = String(this._nextId++);
      const answer = new Promise((resolve, reject) => {
        const onAbort = () => {
          this._waiting.delete(id);
          reject(signal.reason);
        };
        signal.addEventListener('abort', onAbort, { once: true });
        this._waiting.set(id, {
          resolve: (r) => {
            signal.removeEventListener('abort', onAbort);
            resolve(r);
          },
          reject: (e) => {
            signal.removeEventListener('abort', onAbort);
            reject(e);
          },
        });
      });
      this._call.write({ id, ...op });
      return await answer;
    } finally {
      this._release();
    }
  }

  _place(signal) {
    if (signal.aborted) return Promise.reject(signal.reason);
    if (this._free > 0) {
      this._free--;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      const onAbort = () => {
        this._queue.splice(this._queue.indexOf(waiter), 1);
        reject(signal.reason);
      };
      waiter.resolve = () => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      };
      signal.addEventListener('abort', onAbort, { once: true });
      this._queue.push(waiter);
    });
  }

  _release() {
    const next = this._queue.shift();
    if (next) next.resolve();
    else this._free++;
  }

  _answer(r) {
    // No waiter: its deadline passed, and the late response is dropped.
    const waiter = this._waiting.get(r.id);
    if (!waiter) return;
    this._waiting.delete(r.id);
    waiter.resolve(r);
  }

  _end(s) {
    if (this.ended) return;
    // The server's drain: "requests without a response were not applied" (the Pipeline
    // contract in session_store.proto).
    const unapplied = s.code === Code.UNAVAILABLE && s.details === 'shutting down';
    this.ended = new Ended(`${s.code === Code.OK ? 'OK' : `code ${s.code}`}: ${s.details}`, unapplied);
    const waiting = [...this._waiting.values()];
    this._waiting.clear();
    for (const w of waiting) w.reject(this.ended);
    for (const w of this._queue.splice(0)) w.resolve();
  }
}

module.exports = { Pipe, Ended, NotSent };
