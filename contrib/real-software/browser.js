// What a user does in Chromium, through one address: the page and its
// assets, a reload, Server-Sent Events, a WebSocket, fetch() with CSRF, a
// form upload of 3 MB, a 20 MB download, and Django's admin (login, add a
// group, list it, logout). Prints one JSON line: `checks` must equal those
// of the backend reached directly, `timings` are for reading.
// Usage: node browser.js BASE_URL [WS_BASE_URL]  (with playwright-core)
const { chromium } = require('playwright-core');
const crypto = require('crypto');
const fs = require('fs');

const base = process.argv[2];
const wsBase = process.argv[3] || base.replace(/^http/, 'ws');
const sha = (buf) => crypto.createHash('sha256').update(buf).digest('hex');

const checks = {};
const timings = { protocol: '?', page_ms: 0, download_ms: 0, sse_ms: [], statuses: {} };
let browser;
(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
  const context = await browser.newContext({ acceptDownloads: true, ignoreHTTPSErrors: true });
  const page = await context.newPage();
  // Which answers are 200 and which 304 depends on the cache's heuristic
  // freshness (Last-Modified of files collected seconds ago), so they are
  // counted for reading; errors are compared.
  const statuses = {};
  const failed = [];
  page.on('response', (r) => {
    statuses[r.status()] = (statuses[r.status()] || 0) + 1;
    if (r.status() >= 400) failed.push(r.url().replace(base, '') + ' ' + r.status());
  });
  // The page closes its EventSource while the stream is open: not a failure.
  page.on('requestfailed', (r) => {
    if (!r.url().endsWith('/sse/')) failed.push(r.url().replace(base, '') + ' ' + r.failure().errorText);
  });

  let t = Date.now();
  const index = await page.goto(base + '/');
  await page.waitForLoadState('load');
  checks.index = {
    status: index.status(),
    images: await page.evaluate(() => [...document.images].filter((i) => i.complete && i.naturalWidth > 0).length),
    css: await page.evaluate(() => getComputedStyle(document.getElementById('t')).color),
    js: await page.evaluate(() => window.loaded === true),
  };
  timings.protocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  timings.page_ms = Date.now() - t;
  checks.reload = (await page.reload()).status();

  // Five events 200 ms apart: streamed, the first comes long before the last.
  const sse = await page.evaluate(() => new Promise((done) => {
    const t0 = performance.now();
    const got = [];
    const source = new EventSource('/sse/');
    source.onmessage = (e) => {
      got.push([e.data, Math.round(performance.now() - t0)]);
      if (got.length === 5) { source.close(); done(got); }
    };
    source.onerror = () => { source.close(); done(got.concat([['error', 0]])); };
  }));
  checks.sse = { events: sse.map((e) => e[0]), streamed: sse.length === 5 && sse[4][1] - sse[0][1] > 600 };
  timings.sse_ms = sse.map((e) => e[1]);

  checks.websocket = await page.evaluate((url) => new Promise((done) => {
    const got = [];
    const ws = new WebSocket(url + '/ws/room?x=1');
    ws.onmessage = (e) => {
      got.push(e.data.slice(0, 40));
      if (got.length === 1) ws.send('x'.repeat(70000));
      if (got.length === 2) { ws.close(); done(got); }
    };
    ws.onerror = () => done(got.concat(['error']));
    setTimeout(() => done(got.concat(['timeout'])), 5000);
  }), wsBase);

  checks.fetch = await page.evaluate(async () => {
    const token = document.cookie.split('; ').find((c) => c.startsWith('csrftoken=')).split('=')[1];
    const r = await fetch('/echo/', {
      method: 'POST',
      headers: { 'X-CSRFToken': token, 'Content-Type': 'application/json' },
      body: JSON.stringify({ a: 1, u: 'é' }),
    });
    const body = await r.json();
    return [r.status, body.method, body.body, Object.keys(body.cookies)];
  });

  const upload = crypto.randomBytes(3 * 1024 * 1024);
  await page.fill('#note', 'héllo');
  await page.setInputFiles('#file', { name: 'a.bin', mimeType: 'application/octet-stream', buffer: upload });
  await Promise.all([page.waitForNavigation(), page.click('#go')]);
  checks.upload = (await page.textContent('#r')) === `note=héllo size=${upload.length} sha=${sha(upload)}`;

  await page.goto(base + '/');
  t = Date.now();
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.evaluate(() => {
      const a = document.createElement('a');
      a.href = '/download/?mb=20';
      a.download = '';
      document.body.appendChild(a);
      a.click();
    }),
  ]);
  const file = fs.readFileSync(await download.path());
  checks.download = { name: download.suggestedFilename(), size: file.length, sha: sha(file).slice(0, 16) };
  timings.download_ms = Date.now() - t;

  await page.goto(base + '/admin/');
  await page.fill('#id_username', 'admin');
  await page.fill('#id_password', 'pw12345');
  await Promise.all([page.waitForNavigation(), page.click('input[type=submit]')]);
  checks.admin = { login: await page.title() };
  const group = 'g' + Date.now() + Math.random().toString(36).slice(2, 6);
  await page.goto(base + '/admin/auth/group/add/');
  await page.fill('#id_name', group);
  await Promise.all([page.waitForNavigation(), page.click('input[name=_save]')]);
  await page.goto(base + '/admin/auth/group/');
  checks.admin.listed = (await page.content()).includes(group);
  await Promise.all([page.waitForNavigation(), page.click('#logout-form button')]);
  checks.admin.logout = await page.title();

  checks.failed = failed;
  timings.statuses = statuses;
})()
  // A step that fails ends the run: what it checked so far is printed with
  // the error, so that the comparison names it.
  .catch((e) => { checks.error = String(e.message).split('\n')[0]; })
  .finally(async () => {
    console.log(JSON.stringify({ checks, timings }));
    if (browser) await browser.close();
  });
