'use strict';
// The session cookie: express-session's `req.session.cookie` (maxAge, expires, secure,
// httpOnly, sameSite, domain, path, partitioned), and the Set-Cookie header it makes.
//
// The cookie is not stored in sessiond: each request starts from the middleware's options,
// and changes made to it in a request apply to the Set-Cookie of that request's response.

const SAME_SITE = { true: 'Strict', strict: 'Strict', lax: 'Lax', none: 'None' };

/** Names the first cookie setting browsers would drop (as the Rust layer's build() does). */
function validate(name, o) {
  const bad = (m) => {
    throw new TypeError(`sessiond(): ${m}`);
  };
  if (!/^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/.test(name)) bad(`name ${JSON.stringify(name)} is not a cookie name`);
  if (o.sameSite !== false && o.sameSite !== undefined && o.sameSite !== null && !(String(o.sameSite).toLowerCase() in SAME_SITE)) {
    bad("cookie.sameSite must be true, false, 'lax', 'strict' or 'none'");
  }
  if (o.maxAge != null && !(Number.isFinite(o.maxAge) && o.maxAge > 0)) bad('cookie.maxAge must be a positive number of milliseconds or null');
  const sameSite = sameSiteOf(o.sameSite);
  if (name.startsWith('__Host-')) {
    if (!o.secure) bad('a __Host- cookie needs cookie.secure');
    if (o.domain) bad('a __Host- cookie must not have cookie.domain');
    if (o.path !== '/') bad("a __Host- cookie needs cookie.path '/'");
  }
  if (name.startsWith('__Secure-') && !o.secure) bad('a __Secure- cookie needs cookie.secure');
  if (sameSite === 'None' && !o.secure) bad("cookie.sameSite 'none' needs cookie.secure");
  if (o.partitioned && !o.secure) bad('cookie.partitioned needs cookie.secure');
}

function sameSiteOf(v) {
  if (v === false || v == null) return null;
  return SAME_SITE[String(v).toLowerCase()] || null;
}

class Cookie {
  constructor(o) {
    this.path = o.path;
    this.httpOnly = o.httpOnly;
    this.secure = o.secure;
    this.sameSite = o.sameSite;
    this.domain = o.domain;
    this.partitioned = o.partitioned;
    /** The maxAge it was made with (null: a browser-session cookie). */
    this.originalMaxAge = o.maxAge ?? null;
    this._expires = null;
    if (this.originalMaxAge != null) this.maxAge = this.originalMaxAge;
    /** Set once the app changes maxAge or expires: the response then sends the cookie. */
    this.changed = false;
  }

  /** When the cookie expires (null: when the browser closes). */
  get expires() {
    return this._expires;
  }

  set expires(date) {
    this._expires = date ? new Date(date) : null;
    this.originalMaxAge = this.maxAge;
    this.changed = true;
  }

  /** Milliseconds left until `expires` (null for a browser-session cookie). */
  get maxAge() {
    return this._expires ? this._expires.getTime() - Date.now() : null;
  }

  set maxAge(ms) {
    if (ms != null && !Number.isFinite(ms)) throw new TypeError('cookie.maxAge must be a number or null');
    this._expires = ms == null ? null : new Date(Date.now() + ms);
    this.originalMaxAge = ms ?? null;
    this.changed = true;
  }

  /** Starts maxAge over from now (express-session's `resetMaxAge`). */
  resetMaxAge() {
    this.maxAge = this.originalMaxAge;
  }

  /** The `Set-Cookie` value naming `value`. */
  serialize(name, value) {
    const parts = [`${name}=${value}`];
    if (this.domain) parts.push(`Domain=${this.domain}`);
    if (this.path) parts.push(`Path=${this.path}`);
    if (this._expires) {
      parts.push(`Expires=${this._expires.toUTCString()}`);
      parts.push(`Max-Age=${Math.max(0, Math.round(this.maxAge / 1000))}`);
    }
    if (this.httpOnly) parts.push('HttpOnly');
    if (this.secure) parts.push('Secure');
    const sameSite = sameSiteOf(this.sameSite);
    if (sameSite) parts.push(`SameSite=${sameSite}`);
    if (this.partitioned) parts.push('Partitioned');
    return parts.join('; ');
  }

  /** The `Set-Cookie` value that deletes the cookie. */
  serializeClear(name) {
    const gone = Object.create(this);
    gone._expires = new Date(0);
    return Cookie.prototype.serialize.call(gone, name, '');
  }

  toJSON() {
    return {
      originalMaxAge: this.originalMaxAge,
      expires: this._expires,
      secure: this.secure,
      httpOnly: this.httpOnly,
      domain: this.domain,
      path: this.path,
      sameSite: this.sameSite,
      partitioned: this.partitioned,
    };
  }
}

/** The value of cookie `name` in a Cookie header, or null. */
function read(header, name) {
  if (!header) return null;
  for (const part of header.split(';')) {
    const eq = part.indexOf('=');
    if (eq < 0) continue;
    if (part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return null;
}

module.exports = { Cookie, validate, read };
