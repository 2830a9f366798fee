'use strict';
// A company's identity as its creds carry it: the Signal registrationId and
// the paired account (creds.me.id, absent before pairing). Fresh creds made by
// a store that fell back to initAuthCreds() show a new registrationId and no
// me: /health reports both so that a switch can tell (../shared/DOMAIN.md 6).

/** {registrationId: integer or null, me: string or null} of a creds object (any shape). */
function credsIdentity(creds) {
  const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
  if (!isObject(creds)) return { registrationId: null, me: null };
  return {
    registrationId: Number.isInteger(creds.registrationId) ? creds.registrationId : null,
    me: isObject(creds.me) && typeof creds.me.id === 'string' ? creds.me.id : null,
  };
}

module.exports = { credsIdentity };
