// Drives Debian's Chromium (through npm's playwright-core, never a downloaded browser) against a
// running ComfyUI test server, for tests/test_browser.py and tests/test_workflows.py.
//
//   node driver.mjs REQUEST.json   -> prints one line of JSON (the result) on stdout
//
// REQUEST: {"command": "to-prompt" | "edit", "url": "http://127.0.0.1:PORT", "chromium": path,
//           "out": folder for screenshots, ...command arguments}.
// The script only acts and measures; the assertions are made by pytest on what it returns.

import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const log = (...args) => console.error("[driver]", ...args);

const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage", "--force-device-scale-factor=1",
];

async function openComfy(browser, url) {
  const page = await browser.newPage({ viewport: { width: 1500, height: 950 } });
  const pageErrors = [];
  const consoleErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e.stack || e)));
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(m.text());
  });
  await page.goto(url, { waitUntil: "load", timeout: 90_000 });
  await page.waitForFunction(
    () => window.app?.graph && window.LiteGraph?.registered_node_types?.DragNoisePointEditor
      && window.app.extensions?.some((e) => e.name === "DragNoise.PointEditor"),
    null, { timeout: 90_000 });
  // Errors while the frontend starts are kept apart: newer frontends throw some of their own on a
  // fresh profile (with or without this pack); the tests check that none comes from the pack.
  const startupErrors = pageErrors.splice(0);
  return { page, pageErrors, consoleErrors, startupErrors };
}

// The visible Queue / Run button: the 2024 frontend's menu button, or the newer top bar's.
async function clickQueueButton(page) {
  const buttons = page.locator('#queue-button, [data-testid="queue-button"]').filter({ visible: true });
  await buttons.first().click();
}

// ---- in-page helpers (serialized into the page by page.evaluate) -----------------------------

function pageLoadWorkflow(workflow) {
  return window.app.loadGraphData(workflow).then(() => true);
}

function pageNodesOf(type) {
  const graph = window.app.graph;
  return (graph._nodes ?? graph.nodes).filter((n) => n.type === type).map((n) => n.id);
}

// Test setup only: the shipped loaders need SD1.5 files the test machine cannot have, so the
// checkpoint loader and the text encoders are replaced by the test-only tiny-model nodes, keeping
// every other node, widget and link of the workflow as shipped.
function pageSwapToTestNodes() {
  const { app, LiteGraph } = window;
  const graph = app.graph;
  const nodes = () => [...(graph._nodes ?? graph.nodes)];
  const getLink = (id) => (graph.links.get ? graph.links.get(id) : graph.links[id]);
  // Fixed ids per test node: the 2024 server reuses a cached output when a node id comes back with
  // the same inputs, even under another class, so a test node must not take an id that another
  // test's prompt gave to a different node.
  const ids = { DragNoiseTestTinyModel: 1100, DragNoiseTestTinyVAE: 1200, DragNoiseTestTinyConditioning: 1300 };
  const make = (type, pos) => {
    const n = LiteGraph.createNode(type);
    n.pos = [pos[0], pos[1]];
    n.id = ids[type]++;
    graph.add(n);
    return n;
  };
  const relink = (from, slot, to) => {
    for (const id of [...(from.outputs[slot].links ?? [])]) {
      const link = getLink(id);
      to.connect(0, graph.getNodeById(link.target_id), link.target_slot);
    }
  };
  for (const ck of nodes().filter((n) => n.type === "CheckpointLoaderSimple")) {
    relink(ck, 0, make("DragNoiseTestTinyModel", ck.pos));
    relink(ck, 2, make("DragNoiseTestTinyVAE", [ck.pos[0], ck.pos[1] + 90]));
    graph.remove(ck);
  }
  for (const te of nodes().filter((n) => n.type === "CLIPTextEncode")) {
    relink(te, 0, make("DragNoiseTestTinyConditioning", te.pos));
    graph.remove(te);
  }
  return true;
}

// {node type: {widget name: value}}: what a person would type into those widgets.
function pageSetWidgets(byType) {
  const graph = window.app.graph;
  for (const [type, values] of Object.entries(byType)) {
    for (const n of (graph._nodes ?? graph.nodes).filter((node) => node.type === type)) {
      for (const [name, value] of Object.entries(values)) n.widgets.find((w) => w.name === name).value = value;
    }
  }
  return true;
}

function pageShowNode(id) {
  const { app } = window;
  const node = app.graph.getNodeById(id);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [40 - node.pos[0], 80 - node.pos[1]];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return true;
}

function pageEditorGeometry(id) {
  const { app, LiteGraph } = window;
  const node = app.graph.getNodeById(id);
  const widget = node.widgets.find((w) => w.name === "dragnoise_canvas");
  const canvas = widget.element.querySelector("canvas");
  const rect = canvas.getBoundingClientRect();
  const buttons = {};
  for (const b of widget.element.querySelectorAll("[data-action]")) {
    const r = b.getBoundingClientRect();
    buttons[b.dataset.action] = { x: r.left + r.width / 2, y: r.top + r.height / 2, visible: r.width > 0 };
  }
  const gc = app.canvas.canvas.getBoundingClientRect();
  const { scale, offset } = app.canvas.ds;
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const nodeRect = {
    x: gc.left + (node.pos[0] + offset[0]) * scale - 4,
    y: gc.top + (node.pos[1] + offset[1] - title) * scale - 4,
    width: node.size[0] * scale + 8,
    height: (node.size[1] + title) * scale + 8,
  };
  return { canvas: { x: rect.left, y: rect.top, width: rect.width, height: rect.height }, buttons, nodeRect };
}

// Colours the editor shows at the given screen points (CSS pixels of the page).
function pageCanvasColors([id, points]) {
  const node = window.app.graph.getNodeById(id);
  const canvas = node.widgets.find((w) => w.name === "dragnoise_canvas").element.querySelector("canvas");
  const rect = canvas.getBoundingClientRect();
  const ctx = canvas.getContext("2d");
  return points.map(([x, y]) => {
    const px = Math.floor(((x - rect.left) * canvas.width) / rect.width);
    const py = Math.floor(((y - rect.top) * canvas.height) / rect.height);
    return Array.from(ctx.getImageData(px, py, 1, 1).data.slice(0, 3));
  });
}

function pageWidgetValues(id) {
  const node = window.app.graph.getNodeById(id);
  const get = (name) => node.widgets.find((w) => w.name === name).value;
  return { points: get("points"), mask: get("mask") };
}

function pageSetBrush([id, size]) {
  const node = window.app.graph.getNodeById(id);
  const input = node.widgets.find((w) => w.name === "dragnoise_canvas").element.querySelector('[data-action="brush"]');
  input.value = String(size);
  input.dispatchEvent(new Event("input", { bubbles: true }));
  return input.value;
}

// ---- commands ---------------------------------------------------------------------------------

async function toPrompt(browser) {
  const { page, pageErrors, consoleErrors, startupErrors } = await openComfy(browser, request.url);
  const prompts = {};
  for (const [name, workflow] of Object.entries(request.workflows)) {
    await page.evaluate(pageLoadWorkflow, workflow);
    await page.evaluate(pageSetWidgets, request.widgets?.[name] ?? {});
    prompts[name] = await page.evaluate(async () => (await window.app.graphToPrompt()).output);
  }
  return { prompts, pageErrors, consoleErrors, startupErrors };
}

async function edit(browser) {
  const started = Date.now();
  const { page, pageErrors, consoleErrors, startupErrors } = await openComfy(browser, request.url);
  await page.evaluate(pageLoadWorkflow, request.workflow);
  const [editorId] = await page.evaluate(pageNodesOf, "DragNoisePointEditor");
  await page.evaluate(pageSwapToTestNodes);
  await page.evaluate(pageSetWidgets, request.settings);
  await page.evaluate(pageShowNode, editorId);
  const { width: W, height: H } = request.image;

  // The image must show on the canvas without any run (it comes from Load Image).
  let geometry;
  const toScreen = ([x, y]) => {
    const c = geometry.canvas;
    const scale = Math.min(c.width / W, c.height / H);
    const ox = c.x + (c.width - W * scale) / 2;
    const oy = c.y + (c.height - H * scale) / 2;
    return [ox + (x + 0.5) * scale, oy + (y + 0.5) * scale];
  };
  let shown = null;
  for (let i = 0; i < 100; i++) {
    await page.waitForTimeout(100);
    geometry = await page.evaluate(pageEditorGeometry, editorId);
    shown = await page.evaluate(pageCanvasColors, [editorId, request.probe.map(toScreen)]);
    if (shown.some(([r, g, b]) => r + g + b > 30)) break;
  }
  await page.waitForTimeout(300);
  geometry = await page.evaluate(pageEditorGeometry, editorId);
  shown = await page.evaluate(pageCanvasColors, [editorId, request.probe.map(toScreen)]);

  const values = {};
  const click = async (p) => {
    const [x, y] = toScreen(p);
    await page.mouse.click(x, y);
  };
  const drag = async (from, to, steps = 8) => {
    const [x0, y0] = toScreen(from);
    const [x1, y1] = toScreen(to);
    await page.mouse.move(x0, y0);
    await page.mouse.down();
    await page.mouse.move(x1, y1, { steps });
    await page.mouse.up();
  };
  const press = async (action) => {
    const b = (await page.evaluate(pageEditorGeometry, editorId)).buttons[action];
    await page.mouse.click(b.x, b.y);
  };

  for (const [h, t] of request.pairs) {
    await click(h);
    await click(t);
  }
  values.placed = await page.evaluate(pageWidgetValues, editorId);
  await drag(request.move.from, request.move.to);
  values.moved = await page.evaluate(pageWidgetValues, editorId);
  await press("undo");
  values.undone = await page.evaluate(pageWidgetValues, editorId);
  await drag(request.final_move.from, request.final_move.to);
  values.final = await page.evaluate(pageWidgetValues, editorId);
  await press("mode");
  await page.evaluate(pageSetBrush, [editorId, request.brush]);
  await drag(request.stroke.from, request.stroke.to, 12);
  await page.mouse.move(5, 5); // no brush cursor in the picture
  values.painted = await page.evaluate(pageWidgetValues, editorId);

  await page.waitForTimeout(200);
  geometry = await page.evaluate(pageEditorGeometry, editorId);
  const r = geometry.nodeRect;
  const screenshot = `${request.out}/point-editor.png`;
  await page.screenshot({ path: screenshot, clip: { x: Math.max(0, r.x), y: Math.max(0, r.y), width: r.width, height: r.height } });
  await page.screenshot({ path: `${request.out}/page.png` });

  // Queue with the UI's own button and wait until the server has the prompt.
  const before = Object.keys(await (await fetch(`${request.url}/history`)).json());
  await clickQueueButton(page);
  let promptId = null;
  for (let i = 0; i < 200 && !promptId; i++) {
    await page.waitForTimeout(100);
    const queue = await (await fetch(`${request.url}/queue`)).json();
    const history = await (await fetch(`${request.url}/history`)).json();
    const ids = [...queue.queue_running, ...queue.queue_pending].map((q) => q[1]).concat(Object.keys(history));
    promptId = ids.find((id) => !before.includes(id)) ?? null;
  }
  return { shown, values, promptId, screenshot, pageErrors, consoleErrors, startupErrors, seconds: (Date.now() - started) / 1000 };
}

// A person's actions, one step at a time, with observations recorded along the way. Image points
// are in the editor image's pixels; observations are kept under each step's "as" name; the driver maps them to the screen from the canvas's on-screen
// box (the image is drawn fitted and centred in it), not from the widget's own code.
async function steps(browser) {
  const started = Date.now();
  const { page, pageErrors, consoleErrors, startupErrors } = await openComfy(browser, request.url);
  const record = {};
  let editorId = null;
  let size = null;
  const geometry = () => page.evaluate(pageEditorGeometry, editorId);
  const toScreen = async ([x, y]) => {
    const c = (await geometry()).canvas;
    const scale = Math.min(c.width / size[0], c.height / size[1]);
    return [c.x + (c.width - size[0] * scale) / 2 + (x + 0.5) * scale, c.y + (c.height - size[1] * scale) / 2 + (y + 0.5) * scale];
  };
  const status = () => page.evaluate((id) => window.app.graph.getNodeById(id).widgets
    .find((w) => w.name === "dragnoise_canvas").element.querySelector(".dragnoise-status").textContent, editorId);
  for (const step of request.steps) {
    const button = step.button === "right" ? "right" : "left";
    const note = (value) => {
      if (step.as) record[step.as] = value;
    };
    switch (step.do) {
      case "load":
        await page.evaluate(pageLoadWorkflow, step.workflow);
        [editorId] = await page.evaluate(pageNodesOf, "DragNoisePointEditor");
        await page.evaluate(pageShowNode, editorId);
        break;
      case "swap":
        await page.evaluate(pageSwapToTestNodes);
        break;
      case "set":
        await page.evaluate(pageSetWidgets, step.widgets);
        break;
      case "wait_image": {
        size = step.size;
        let text = "";
        for (let i = 0; i < 300 && !text.includes(`${size[0]}x${size[1]}`); i++) {
          await page.waitForTimeout(100);
          text = await status();
        }
        await page.waitForTimeout(200);
        note({ status: text });
        break;
      }
      case "status":
        note({ status: await status() });
        break;
      case "click": {
        const [x, y] = await toScreen(step.at);
        await page.mouse.click(x, y, { button });
        break;
      }
      case "drag": {
        const [x0, y0] = await toScreen(step.from);
        const [x1, y1] = await toScreen(step.to);
        await page.mouse.move(x0, y0);
        await page.mouse.down({ button });
        await page.mouse.move(x1, y1, { steps: 10 });
        await page.mouse.up({ button });
        break;
      }
      case "press": {
        const b = (await geometry()).buttons[step.action];
        await page.mouse.click(b.x, b.y);
        break;
      }
      case "close_dialogs": {
        // Newer frontends show a run's error in a modal dialog over the canvas; a person closes it.
        const close = page.locator(".p-dialog .p-dialog-close-button").filter({ visible: true });
        for (let i = 0; i < 50 && (await close.count()); i++) {
          await close.first().click({ force: true }); // its entry animation never reads as stable
          await page.waitForTimeout(100);
        }
        break;
      }
      case "key":
        await page.keyboard.press(step.key);
        break;
      case "brush":
        await page.evaluate(pageSetBrush, [editorId, step.size]);
        break;
      case "values":
        note(await page.evaluate(pageWidgetValues, editorId));
        break;
      case "colors":
        note({ colors: await page.evaluate(pageCanvasColors, [editorId, await Promise.all(step.at.map(toScreen))]) });
        break;
      case "canvas_box":
        note({ box: (await geometry()).canvas });
        break;
      case "resize": {
        // Drag the node's bottom-right corner, as a person resizes a node.
        const r = (await geometry()).nodeRect;
        const [cx, cy] = [r.x + r.width - 4 - 3, r.y + r.height - 4 - 3];
        await page.mouse.move(cx, cy);
        await page.mouse.down();
        await page.mouse.move(cx + step.by[0], cy + step.by[1], { steps: 10 });
        await page.mouse.up();
        await page.waitForTimeout(300);
        break;
      }
      case "reload": {
        // Save the workflow as the UI does and open it again.
        await page.evaluate(async () => {
          const saved = JSON.parse(JSON.stringify(window.app.graph.serialize()));
          await window.app.loadGraphData(saved);
        });
        [editorId] = await page.evaluate(pageNodesOf, "DragNoisePointEditor");
        await page.evaluate(pageShowNode, editorId);
        break;
      }
      case "saved":
        note({ saved: await page.evaluate(() => window.app.graph.serialize()) });
        break;
      case "queue": {
        const before = Object.keys(await (await fetch(`${request.url}/history`)).json());
        await clickQueueButton(page);
        let promptId = null;
        for (let i = 0; i < 200 && !promptId; i++) {
          await page.waitForTimeout(100);
          const queue = await (await fetch(`${request.url}/queue`)).json();
          const history = await (await fetch(`${request.url}/history`)).json();
          const ids = [...queue.queue_running, ...queue.queue_pending].map((q) => q[1]).concat(Object.keys(history));
          promptId = ids.find((id) => !before.includes(id)) ?? null;
        }
        let done = false;
        for (let i = 0; i < 6000 && !done && promptId; i++) {
          await page.waitForTimeout(100);
          const entry = (await (await fetch(`${request.url}/history/${promptId}`)).json())[promptId];
          done = ["success", "error"].includes(entry?.status?.status_str);
        }
        note({ promptId });
        break;
      }
      case "screenshot": {
        const r = (await geometry()).nodeRect;
        await page.screenshot({ path: `${request.out}/${step.name}`, clip: { x: Math.max(0, r.x), y: Math.max(0, r.y), width: r.width, height: r.height } });
        break;
      }
      default:
        throw new Error(`unknown step ${step.do}`);
    }
  }
  return { record, pageErrors, consoleErrors, startupErrors, seconds: (Date.now() - started) / 1000 };
}

const browser = await chromium.launch({ executablePath: request.chromium, headless: true, args: FLAGS });
try {
  const commands = { "to-prompt": toPrompt, edit, steps };
  const result = await commands[request.command](browser);
  process.stdout.write(JSON.stringify(result) + "\n");
} finally {
  await browser.close();
}
