// A WebSocket backend for scripts/real-software.sh: greets with the
// request's path and echoes every message. Usage: node ws.js PORT
const { WebSocketServer } = require('ws');
const server = new WebSocketServer({ port: Number(process.argv[2]) });
server.on('connection', (ws, req) => {
  ws.send('hello ' + req.url);
  ws.on('message', (m) => ws.send('echo:' + m));
});
