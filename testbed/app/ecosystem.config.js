'use strict';
// PM2 definition of the test application: `pm2 start ecosystem.config.js`.
// Configuration comes from .env at the app root, not from here: variables
// set in this file would beat .env (dotenv never overrides the environment).
module.exports = {
  apps: [
    {
      name: 'baileys-whatsapp-service',
      script: 'src/index.js',
      cwd: __dirname,
      exec_mode: 'fork',
      instances: 1,
      autorestart: true,
      // The service sends 'ready' once its store is loaded and healthy; PM2
      // still marks it online after listen_timeout (and `pm2 start/restart`
      // wait that long for a service that never gets ready): readiness is
      // /health, not PM2's status.
      wait_ready: true,
      listen_timeout: 10000,
      kill_timeout: 10000,
      min_uptime: 5000,
      max_restarts: 10,
      restart_delay: 1000,
      merge_logs: true,
      env: {
        NODE_ENV: 'production',
      },
    },
  ],
};
