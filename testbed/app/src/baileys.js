'use strict';
// Loads the Baileys package (an ES module) from CommonJS. The package is
// resolved with require.resolve, which honours NODE_PATH (a bare import()
// does not), then imported by file URL: one module instance either way.

const { pathToFileURL } = require('node:url');

let baileysPromise = null;

function loadBaileys() {
  if (!baileysPromise) {
    baileysPromise = (async () => import(pathToFileURL(require.resolve('baileys')).href))();
    baileysPromise.catch(() => {
      baileysPromise = null; // let a later call try again
    });
  }
  return baileysPromise;
}

module.exports = { loadBaileys };
