'use strict';
// Where calls go: the seed addresses in turn until one answers, and the leader once a reply
// names it in `sessiond-leader` (a follower would forward every call to it). As the Rust
// client's Router (connection.rs).

/** Response metadata naming the group's leader (host:port), on a replicated sessiond. */
const LEADER_HEADER = 'sessiond-leader';

/**
 * `host:port` from `host:port`, `http://host:port` or `https://host:port`, and whether the
 * scheme asked for TLS; throws a sentence naming the address otherwise.
 */
function parseAddress(address) {
  let target = String(address).trim().replace(/\/+$/, '');
  if (!target) throw new Error('a sessiond address is empty: expected host:port or http(s)://host:port');
  let tls = false;
  const scheme = /^([a-z]+):\/\//i.exec(target);
  if (scheme) {
    const name = scheme[1].toLowerCase();
    if (name !== 'http' && name !== 'https') {
      throw new Error(`sessiond address ${JSON.stringify(address)}: scheme must be http or https`);
    }
    tls = name === 'https';
    target = target.slice(scheme[0].length);
  }
  if (!/^[^\s/,]+:\d+$/.test(target)) throw new Error(`sessiond address ${JSON.stringify(address)}: expected host:port`);
  return { target, tls };
}

class Router {
  /** Routes over `seeds` (host:port targets). */
  constructor(seeds) {
    this.seeds = seeds;
    /** The leader's target, as the last reply that named one said. */
    this.leader = null;
    /** The seed to try first: the last one that answered. */
    this.firstSeed = 0;
  }

  /** The targets to try, in order: the leader if known, then every seed from the one that last answered. */
  candidates() {
    const n = this.seeds.length;
    const out = this.leader === null ? [] : [this.leader];
    for (let i = 0; i < n; i++) {
      const seed = this.seeds[(this.firstSeed + i) % n];
      if (seed !== this.leader) out.push(seed);
    }
    return out;
  }

  /** `target` answered: start with it next time (if a seed). */
  answered(target) {
    const i = this.seeds.indexOf(target);
    if (i >= 0) this.firstSeed = i;
  }

  /** `target` could not be reached: if it was the leader, forget it, so the seeds are tried. */
  unreachable(target) {
    if (this.leader === target) this.leader = null;
  }

  /**
   * A reply from `on` named `header` as the leader: records it. Whether calls should move:
   * the leader is known and is not `on`. A header that is no address is ignored.
   */
  leaderSays(on, header) {
    let leader;
    try {
      leader = parseAddress(header).target;
    } catch {
      return false;
    }
    this.leader = leader;
    return leader !== on;
  }
}

module.exports = { Router, parseAddress, LEADER_HEADER };
