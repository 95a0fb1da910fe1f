// Drives the system Firefox ESR through WebDriver BiDi (puppeteer-core; no browser download)
// for tests/test_browsers.py, one command per line:
//   stdin:  {"op": "goto"|"eval"|"type"|"click"|"wait"|"close", ...}  (JSON, one per line)
//   stdout: {"ok": VALUE} or {"error": "MESSAGE"}                     (JSON, one per line)
// The first line out, once Firefox is up, is {"ok": {"version": VERSION}}.
// Usage: node firefox.mjs FIREFOX_BINARY PROFILE_DIR; HOME comes from the environment.
import puppeteer from 'puppeteer-core';
import readline from 'node:readline';

const [executablePath, userDataDir] = process.argv.slice(2);
const reply = (message) => process.stdout.write(JSON.stringify(message) + '\n');

const browser = await puppeteer.launch({
  browser: 'firefox', executablePath, userDataDir, headless: true, env: process.env,
});
const page = await browser.newPage();
reply({ok: {version: await browser.version()}});

const ops = {
  goto: ({url, timeout}) => page.goto(url, {timeout}).then(() => null),
  eval: ({js}) => page.evaluate(js),
  type: ({selector, text}) => page.type(selector, text),
  click: ({selector}) => page.click(selector),
  wait: ({js, timeout}) => page.waitForFunction(js, {timeout, polling: 50}).then(() => null),
};

for await (const line of readline.createInterface({input: process.stdin})) {
  const command = JSON.parse(line);
  if (command.op === 'close') break;
  try {
    reply({ok: (await ops[command.op](command)) ?? null});
  } catch (error) {
    reply({error: String(error && error.message || error)});
  }
}
await browser.close();
reply({ok: null});
process.exit(0);  // stdin may still be open; nothing is left to do
