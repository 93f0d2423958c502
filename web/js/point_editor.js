// DragNoise Point Editor: a canvas on the DragNoisePointEditor node to place handle/target pairs
// and paint the region that may change. It edits the node's own `points` and `mask` widget values
// (hidden text widgets), so saved workflows and API prompts carry exactly what the canvas shows.
//
// Frontend APIs used (kept by the 2024 litegraph frontend and by current ComfyUI frontends):
// app.registerExtension (beforeRegisterNodeDef, nodeCreated), node.addDOMWidget, node.onExecuted,
// node.onConfigure / onConnectionsChange / onResize / onRemoved, node.getInputNode, widget values
// and callbacks, api.apiURL for /view URLs.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "DragNoisePointEditor";
const WIDGET_NAME = "dragnoise_canvas";
const SIZE_PROPERTY = "dragnoise_image_size";
const HANDLE_COLOR = "#ff3b30";
const TARGET_COLOR = "#2f6bff";
const MASK_RGBA = [255, 170, 0, 255];
const MAX_UNDO = 60;
const HIT_RADIUS = 9; // screen pixels
const SOURCE_POLL_MS = 300;

// ---------------------------------------------------------------------------------------------
// Mask layers <-> text. Uncompressed COCO RLE: run lengths of 0s and 1s (starting with 0s) over
// the pixels in column-major order; the Python side (dragnoise/mask.py) reads the same form.

function encodeRLE(layer, width, height) {
  const counts = [];
  let current = 0;
  let run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const v = layer[y * width + x] ? 1 : 0;
      if (v !== current) {
        counts.push(run);
        run = 0;
        current = v;
      }
      run++;
    }
  }
  counts.push(run);
  return { size: [height, width], counts };
}

function decodeRLE(rle) {
  if (!rle || !Array.isArray(rle.size) || !Array.isArray(rle.counts)) throw new Error("not a run-length layer");
  const [height, width] = rle.size;
  const data = new Uint8Array(width * height);
  let i = 0;
  rle.counts.forEach((count, k) => {
    for (let c = 0; c < count; c++, i++) {
      if (k % 2 === 1) {
        const x = Math.floor(i / height);
        const y = i - x * height;
        data[y * width + x] = 1;
      }
    }
  });
  if (i !== width * height) throw new Error("run lengths do not cover the layer");
  return { width, height, data };
}

function anySet(layer) {
  if (!layer) return false;
  for (let i = 0; i < layer.length; i++) if (layer[i]) return true;
  return false;
}

function resampleLayer(data, fromW, fromH, toW, toH) {
  const out = new Uint8Array(toW * toH);
  for (let y = 0; y < toH; y++) {
    const sy = Math.min(fromH - 1, Math.floor(((y + 0.5) * fromH) / toH));
    for (let x = 0; x < toW; x++) {
      const sx = Math.min(fromW - 1, Math.floor(((x + 0.5) * fromW) / toW));
      out[y * toW + x] = data[sy * fromW + sx];
    }
  }
  return out;
}

// Points text: the canonical [{"handle": [x, y], "target": [x, y]}, ...] or DragBench's flat list.
function parsePoints(text) {
  const data = JSON.parse(text || "[]");
  const list = Array.isArray(data) ? data : [data];
  const pairs = [];
  if (list.every((p) => p && typeof p === "object" && !Array.isArray(p))) {
    for (const p of list) pairs.push({ h: [+p.handle[0], +p.handle[1]], t: [+p.target[0], +p.target[1]] });
  } else {
    for (let i = 0; i + 1 < list.length; i += 2) {
      pairs.push({ h: [+list[i][0], +list[i][1]], t: [+list[i + 1][0], +list[i + 1][1]] });
    }
  }
  if (pairs.some((p) => [...p.h, ...p.t].some((v) => !Number.isFinite(v)))) throw new Error("not numbers");
  return pairs;
}

// ---------------------------------------------------------------------------------------------

function hideTextWidget(widget) {
  // Current frontends do not draw a `hidden` widget but still lay it out, a text box taking its
  // share of the node's height, unless computeSize fixes that (at 0: -4 plus the 4 px gap);
  // the 2024 litegraph frontend hides a widget whose type is "hidden" and sizes it the same way.
  // The value is still serialized either way.
  widget.hidden = true;
  try {
    widget.computeSize = () => [0, -4];
  } catch {
    // a frontend whose widgets define computeSize as a read-only accessor
  }
  if (Object.getPrototypeOf(widget) === Object.prototype) widget.type = "hidden";
}

function sourceImageNode(node) {
  const slot = node.inputs?.findIndex((input) => input.name === "image") ?? -1;
  if (slot < 0) return null;
  let src = node.getInputNode(slot);
  for (let hops = 0; src && src.isVirtualNode && src.getInputNode && hops < 32; hops++) src = src.getInputNode(0);
  return src ?? null;
}

function isLoadImage(src) {
  const spec = src.constructor?.nodeData?.input?.required?.image;
  return src.comfyClass === "LoadImage" || spec?.[1]?.image_upload === true;
}

function viewURL({ filename, subfolder = "", type = "input" }) {
  const query = new URLSearchParams({ filename, subfolder, type });
  return api.apiURL(`/view?${query}`);
}

// "sub/name.png [output]" -> {filename, subfolder, type}
function parseImageValue(value) {
  let name = String(value);
  let type = "input";
  const m = name.match(/^(.*) \[(input|output|temp)\]$/);
  if (m) [, name, type] = m;
  const slash = name.lastIndexOf("/");
  return { filename: name.slice(slash + 1), subfolder: slash >= 0 ? name.slice(0, slash) : "", type };
}

function button(label, action, title) {
  const b = document.createElement("button");
  b.textContent = label;
  b.title = title;
  b.dataset.action = action;
  b.className = "dragnoise-btn";
  return b;
}

function injectStyle() {
  if (document.getElementById("dragnoise-point-editor-style")) return;
  const style = document.createElement("style");
  style.id = "dragnoise-point-editor-style";
  style.textContent = `
    .dragnoise-editor { display: flex; flex-direction: column; width: 100%; height: 100%; gap: 4px;
      box-sizing: border-box; font: 12px sans-serif; color: #ddd; }
    .dragnoise-toolbar { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
    .dragnoise-btn { background: #333; color: #ddd; border: 1px solid #555; border-radius: 4px;
      padding: 2px 8px; cursor: pointer; font: 12px sans-serif; }
    .dragnoise-btn:hover { background: #444; }
    .dragnoise-btn.active { background: #5a4a10; border-color: #c90; color: #fff; }
    .dragnoise-brush { display: inline-flex; align-items: center; gap: 4px; }
    .dragnoise-brush input { width: 90px; }
    .dragnoise-stage { position: relative; flex: 1 1 auto; min-height: 0; background: #1b1b1b;
      border-radius: 4px; overflow: hidden; }
    .dragnoise-stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%;
      outline: none; touch-action: none; }
    .dragnoise-status { color: #aaa; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  `;
  document.head.appendChild(style);
}

class PointEditorCanvas {
  constructor(node) {
    this.node = node;
    this.pointsWidget = node.widgets.find((w) => w.name === "points");
    this.maskWidget = node.widgets.find((w) => w.name === "mask");
    this.pairs = []; // {h: [x, y], t: [x, y] | null}; t is null while a handle waits for its target
    this.imgW = 0;
    this.imgH = 0;
    this.image = null; // HTMLImageElement
    this.imageKey = null;
    this.sourceKey = null;
    this.paint = null; // Uint8Array(imgW * imgH) or null
    this.erase = null;
    this.base = null; // upstream mask from the last run, Uint8Array or null
    this.mode = "points";
    this.eraser = false;
    this.brush = 24; // diameter in image pixels
    this.undoStack = [];
    this.selected = -1;
    this.hover = null;
    this.drag = null;
    this.stroke = null;
    this.message = "";
    this.overlay = document.createElement("canvas");
    this.buildDOM();
    for (const w of [this.pointsWidget, this.maskWidget]) {
      if (!w) continue;
      hideTextWidget(w);
      const callback = w.callback;
      const editor = this;
      w.callback = function () {
        const r = callback?.apply(this, arguments);
        if (!editor.syncing) editor.loadFromWidgets();
        return r;
      };
    }
    this.widget = node.addDOMWidget(WIDGET_NAME, "dragnoise-point-editor", this.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => 220,
    });
    this.widget.serializeValue = () => undefined;
    this.loadFromWidgets();
    this.observer = new ResizeObserver(() => this.render());
    this.observer.observe(this.stage);
    this.timer = setInterval(() => this.followSource(), SOURCE_POLL_MS);
  }

  // ----- DOM ---------------------------------------------------------------------------------

  buildDOM() {
    injectStyle();
    this.root = document.createElement("div");
    const inner = document.createElement("div");
    inner.className = "dragnoise-editor";
    this.root.appendChild(inner);
    this.root.style.overflow = "hidden";

    const bar = document.createElement("div");
    bar.className = "dragnoise-toolbar";
    this.modeButton = button("Mask mode", "mode", "Switch between placing points and painting the mask");
    this.undoButton = button("Undo", "undo", "Undo the last change (Ctrl+Z)");
    this.clearButton = button("Clear points", "clear", "Remove every pair (or, in mask mode, the painted mask)");
    this.eraserButton = button("Erase", "eraser", "Erase instead of paint (right-drag erases too)");
    this.brushLabel = document.createElement("label");
    this.brushLabel.className = "dragnoise-brush";
    this.brushLabel.title = "Brush diameter in image pixels";
    this.brushInput = document.createElement("input");
    Object.assign(this.brushInput, { type: "range", min: "1", max: "256", value: String(this.brush) });
    this.brushInput.dataset.action = "brush";
    this.brushValue = document.createElement("span");
    this.brushLabel.append("Brush", this.brushInput, this.brushValue);
    bar.append(this.modeButton, this.undoButton, this.clearButton, this.eraserButton, this.brushLabel);

    this.stage = document.createElement("div");
    this.stage.className = "dragnoise-stage";
    this.canvas = document.createElement("canvas");
    this.canvas.tabIndex = 0;
    this.stage.appendChild(this.canvas);

    this.status = document.createElement("div");
    this.status.className = "dragnoise-status";
    inner.append(bar, this.stage, this.status);

    this.modeButton.addEventListener("click", () => this.setMode(this.mode === "points" ? "mask" : "points"));
    this.undoButton.addEventListener("click", () => this.undo());
    this.clearButton.addEventListener("click", () => this.clear());
    this.eraserButton.addEventListener("click", () => {
      this.eraser = !this.eraser;
      this.updateToolbar();
    });
    this.brushInput.addEventListener("input", () => {
      this.brush = Math.max(1, parseInt(this.brushInput.value, 10) || 1);
      this.updateToolbar();
      this.render();
    });
    const c = this.canvas;
    c.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    c.addEventListener("pointermove", (e) => this.onPointerMove(e));
    c.addEventListener("pointerup", (e) => this.onPointerUp(e));
    c.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    c.addEventListener("pointerleave", () => {
      this.hover = null;
      this.render();
    });
    c.addEventListener("contextmenu", (e) => {
      e.preventDefault();
      e.stopPropagation();
    });
    c.addEventListener("keydown", (e) => this.onKeyDown(e));
    this.updateToolbar();
  }

  updateToolbar() {
    const mask = this.mode === "mask";
    this.modeButton.textContent = mask ? "Points mode" : "Mask mode";
    this.modeButton.classList.toggle("active", mask);
    this.clearButton.textContent = mask ? "Clear mask" : "Clear points";
    this.eraserButton.style.display = mask ? "" : "none";
    this.brushLabel.style.display = mask ? "" : "none";
    this.eraserButton.classList.toggle("active", this.eraser);
    this.brushValue.textContent = `${this.brush}px`;
    this.updateStatus();
  }

  updateStatus() {
    const done = this.pairs.filter((p) => p.t).length;
    const size = this.imgW ? `${this.imgW}x${this.imgH}` : "no image yet";
    let hint;
    if (!this.image && !this.imgW) {
      hint = "connect an image: from Load Image it shows at once, otherwise after the first run";
    } else if (this.mode === "mask") {
      hint = `drag: ${this.eraser ? "erase" : "paint"} the area that may change · right-drag: erase`;
    } else if (this.pairs.some((p) => !p.t)) {
      hint = "click the target (blue) for the handle";
    } else {
      hint = "click: handle (red), then target (blue) · drag: move · right-click / Del: remove pair";
    }
    const text = `${done} pair${done === 1 ? "" : "s"} · ${size} · ${this.message || hint}`;
    this.status.textContent = text;
    this.status.title = text;
  }

  setMode(mode) {
    this.mode = mode;
    this.drag = null;
    this.stroke = null;
    this.updateToolbar();
    this.render();
  }

  // ----- state <-> widgets -------------------------------------------------------------------

  loadFromWidgets() {
    this.message = "";
    try {
      this.pairs = parsePoints(this.pointsWidget?.value);
    } catch (e) {
      this.pairs = [];
      this.message = `points text is not valid (${e.message}); placing points replaces it`;
    }
    this.paint = this.erase = null;
    const text = this.maskWidget?.value;
    if (text && String(text).trim()) {
      try {
        const data = JSON.parse(text);
        for (const name of ["paint", "erase"]) {
          if (!data[name]) continue;
          const layer = decodeRLE(data[name]);
          const fits = !this.imgW || (layer.width === this.imgW && layer.height === this.imgH);
          this[name] = fits ? layer.data : resampleLayer(layer.data, layer.width, layer.height, this.imgW, this.imgH);
          if (!this.imgW) {
            this.pendingMaskSize = [layer.width, layer.height];
          }
        }
      } catch (e) {
        this.message = `mask text is not valid (${e.message}); Clear mask resets it`;
      }
    }
    this.selected = -1;
    this.rebuildOverlay();
    this.updateStatus();
    this.render();
  }

  pointsText() {
    const pairs = this.pairs.filter((p) => p.t).map((p) => ({ handle: [...p.h], target: [...p.t] }));
    return JSON.stringify(pairs);
  }

  maskText() {
    if (!this.imgW || (!anySet(this.paint) && !anySet(this.erase))) return "";
    const data = {};
    if (anySet(this.paint)) data.paint = encodeRLE(this.paint, this.imgW, this.imgH);
    if (anySet(this.erase)) data.erase = encodeRLE(this.erase, this.imgW, this.imgH);
    return JSON.stringify(data);
  }

  commit() {
    this.syncing = true;
    try {
      const points = this.pointsText();
      if (this.pointsWidget && this.pointsWidget.value !== points) this.pointsWidget.value = points;
      const mask = this.maskText();
      if (this.maskWidget && this.maskWidget.value !== mask) this.maskWidget.value = mask;
    } finally {
      this.syncing = false;
    }
    if (this.imgW) this.node.properties[SIZE_PROPERTY] = [this.imgW, this.imgH];
    this.node.setDirtyCanvas?.(true, true);
    this.updateStatus();
    this.render();
  }

  snapshot() {
    return {
      pairs: this.pairs.map((p) => ({ h: [...p.h], t: p.t ? [...p.t] : null })),
      paint: this.paint ? this.paint.slice() : null,
      erase: this.erase ? this.erase.slice() : null,
      w: this.imgW,
      h: this.imgH,
    };
  }

  pushUndo() {
    this.undoStack.push(this.snapshot());
    if (this.undoStack.length > MAX_UNDO) this.undoStack.shift();
  }

  undo() {
    const s = this.undoStack.pop();
    if (!s) return;
    this.pairs = s.pairs;
    if (s.w === this.imgW && s.h === this.imgH) {
      this.paint = s.paint;
      this.erase = s.erase;
    }
    this.selected = -1;
    this.message = "";
    this.rebuildOverlay();
    this.commit();
  }

  clear() {
    this.pushUndo();
    if (this.mode === "mask") {
      this.paint = this.erase = null;
      this.rebuildOverlay();
    } else {
      this.pairs = [];
      this.selected = -1;
    }
    this.message = "";
    this.commit();
  }

  // ----- image --------------------------------------------------------------------------------

  followSource() {
    if (!this.node.graph) return;
    const src = sourceImageNode(this.node);
    let key = "none";
    let ref = null;
    if (src && isLoadImage(src)) {
      const value = src.widgets?.find((w) => w.name === "image")?.value;
      if (value) {
        ref = parseImageValue(value);
        key = `file:${value}`;
      }
    } else if (src) {
      key = `node:${src.id}`;
    }
    if (key === this.sourceKey) return;
    const hadFile = (this.sourceKey || "").startsWith("file:");
    this.sourceKey = key;
    if (ref) {
      this.loadImage(viewURL(ref), key);
    } else if (hadFile) {
      // Another source now: its image is known after the next run (points stay, drawn on grey).
      this.image = null;
      this.imageKey = key;
      this.message = "the image shows after the next run";
      this.updateStatus();
      this.render();
    }
  }

  loadImage(url, key) {
    const img = new Image();
    img.onload = () => {
      if (this.imageKey !== key) return;
      this.setImage(img);
    };
    img.onerror = () => {
      if (this.imageKey !== key) return;
      this.message = "could not load the image";
      this.updateStatus();
    };
    this.imageKey = key;
    img.src = url + (url.includes("?") ? "&" : "?") + `dragnoise=${Date.now()}`;
  }

  setImage(img) {
    this.message = "";
    const w = img.naturalWidth;
    const h = img.naturalHeight;
    const stored = this.node.properties?.[SIZE_PROPERTY];
    const [oldW, oldH] = this.imgW ? [this.imgW, this.imgH] : stored || this.pendingMaskSize || [w, h];
    this.pendingMaskSize = null;
    this.image = img;
    if (oldW !== w || oldH !== h) {
      // Another size: keep the drag where it was on the picture, in the new image's pixels.
      const sx = w / oldW;
      const sy = h / oldH;
      const scale = ([x, y]) => [
        Math.min(w - 1, Math.max(0, Math.round(x * sx))),
        Math.min(h - 1, Math.max(0, Math.round(y * sy))),
      ];
      const had = this.pairs.length > 0 || anySet(this.paint) || anySet(this.erase);
      this.pairs = this.pairs.map((p) => ({ h: scale(p.h), t: p.t ? scale(p.t) : null }));
      if (this.paint) this.paint = resampleLayer(this.paint, oldW, oldH, w, h);
      if (this.erase) this.erase = resampleLayer(this.erase, oldW, oldH, w, h);
      this.base = null;
      this.undoStack = [];
      this.imgW = w;
      this.imgH = h;
      this.message = had ? `image is ${w}x${h} now (was ${oldW}x${oldH}): points and mask rescaled` : "";
      this.rebuildOverlay();
      if (had) this.commit();
    } else {
      this.imgW = w;
      this.imgH = h;
      this.rebuildOverlay();
    }
    if (!this.node.properties) this.node.properties = {};
    this.node.properties[SIZE_PROPERTY] = [w, h];
    this.updateStatus();
    this.render();
  }

  onExecuted(output) {
    const ref = output?.dragnoise_image?.[0];
    // A Load Image source is already shown (and followed); other sources show after a run.
    if (ref && !(this.sourceKey || "").startsWith("file:")) this.loadImage(viewURL(ref), `run:${ref.filename}`);
    const maskRef = output?.dragnoise_base_mask?.[0];
    if (!maskRef) {
      this.base = null;
      this.rebuildOverlay();
      this.render();
      return;
    }
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const px = ctx.getImageData(0, 0, c.width, c.height).data;
      let base = new Uint8Array(c.width * c.height);
      for (let i = 0; i < base.length; i++) base[i] = px[i * 4] >= 128 ? 1 : 0;
      if (this.imgW && (c.width !== this.imgW || c.height !== this.imgH)) {
        base = resampleLayer(base, c.width, c.height, this.imgW, this.imgH);
      }
      this.base = base;
      this.rebuildOverlay();
      this.render();
    };
    img.src = viewURL(maskRef);
  }

  // ----- geometry -----------------------------------------------------------------------------

  layout() {
    const cw = this.canvas.clientWidth;
    const ch = this.canvas.clientHeight;
    const w = this.imgW || 1;
    const h = this.imgH || 1;
    const scale = Math.min(cw / w, ch / h);
    return { cw, ch, scale, ox: (cw - w * scale) / 2, oy: (ch - h * scale) / 2 };
  }

  // Pointer -> image pixels (fractional). The element may be scaled by the graph's zoom, so go
  // through the on-screen rectangle.
  toImage(e) {
    const rect = this.canvas.getBoundingClientRect();
    const { scale, ox, oy, cw, ch } = this.layout();
    const x = ((e.clientX - rect.left) * cw) / rect.width;
    const y = ((e.clientY - rect.top) * ch) / rect.height;
    return [(x - ox) / scale, (y - oy) / scale];
  }

  toPixel([x, y]) {
    return [Math.min(this.imgW - 1, Math.max(0, Math.floor(x))), Math.min(this.imgH - 1, Math.max(0, Math.floor(y)))];
  }

  inside([x, y]) {
    return x >= 0 && y >= 0 && x < this.imgW && y < this.imgH;
  }

  toScreen([x, y]) {
    const { scale, ox, oy } = this.layout();
    return [ox + (x + 0.5) * scale, oy + (y + 0.5) * scale];
  }

  hitTest(e) {
    const rect = this.canvas.getBoundingClientRect();
    const cw = this.canvas.clientWidth;
    const px = ((e.clientX - rect.left) * cw) / rect.width;
    const py = ((e.clientY - rect.top) * this.canvas.clientHeight) / rect.height;
    let best = null;
    let bestD = HIT_RADIUS * HIT_RADIUS;
    this.pairs.forEach((pair, i) => {
      for (const which of ["t", "h"]) {
        if (!pair[which]) continue;
        const [sx, sy] = this.toScreen(pair[which]);
        const d = (sx - px) ** 2 + (sy - py) ** 2;
        if (d <= bestD) {
          bestD = d;
          best = { index: i, which };
        }
      }
    });
    return best;
  }

  // ----- input --------------------------------------------------------------------------------

  onPointerDown(e) {
    this.canvas.focus({ preventScroll: true });
    e.preventDefault();
    e.stopPropagation();
    if (!this.imgW) return;
    const p = this.toImage(e);
    if (this.mode === "mask") {
      if (e.button !== 0 && e.button !== 2) return;
      this.pushUndo();
      this.stroke = { erase: this.eraser || e.button === 2, last: p };
      this.canvas.setPointerCapture(e.pointerId);
      this.dab(p, this.stroke.erase);
      this.render();
      return;
    }
    const hit = this.hitTest(e);
    if (e.button === 2) {
      if (hit) this.removePair(hit.index);
      return;
    }
    if (e.button !== 0) return;
    if (hit) {
      this.pushUndo();
      this.selected = hit.index;
      this.drag = { ...hit, moved: false };
      this.canvas.setPointerCapture(e.pointerId);
      this.render();
      return;
    }
    if (!this.inside(p)) return;
    this.pushUndo();
    const pixel = this.toPixel(p);
    const pending = this.pairs.findIndex((pair) => !pair.t);
    if (pending >= 0) {
      this.pairs[pending].t = pixel;
      this.selected = pending;
    } else {
      this.pairs.push({ h: pixel, t: null });
      this.selected = this.pairs.length - 1;
    }
    this.message = "";
    this.commit();
  }

  onPointerMove(e) {
    if (!this.imgW) return;
    const p = this.toImage(e);
    if (this.stroke) {
      this.line(this.stroke.last, p, this.stroke.erase);
      this.stroke.last = p;
      this.hover = p;
      this.render();
      return;
    }
    if (this.drag) {
      const pair = this.pairs[this.drag.index];
      const pixel = this.toPixel(p);
      if (pixel[0] !== pair[this.drag.which][0] || pixel[1] !== pair[this.drag.which][1]) {
        pair[this.drag.which] = pixel;
        this.drag.moved = true;
        this.render();
      }
      return;
    }
    this.hover = p;
    this.hoverHit = this.mode === "points" ? this.hitTest(e) : null;
    this.canvas.style.cursor = this.hoverHit ? "move" : this.mode === "mask" ? "none" : "crosshair";
    this.render();
  }

  onPointerUp(e) {
    if (this.stroke) {
      this.stroke = null;
      this.commit();
    } else if (this.drag) {
      if (!this.drag.moved) this.undoStack.pop(); // a click on a point only selects it
      this.drag = null;
      this.commit();
    }
    if (this.canvas.hasPointerCapture?.(e.pointerId)) this.canvas.releasePointerCapture(e.pointerId);
  }

  onKeyDown(e) {
    const key = e.key;
    if ((e.ctrlKey || e.metaKey) && (key === "z" || key === "Z")) {
      this.undo();
    } else if ((key === "Delete" || key === "Backspace") && this.mode === "points") {
      const i = this.selected >= 0 ? this.selected : this.pairs.length - 1;
      if (i >= 0) this.removePair(i);
    } else if (key === "Escape" && this.pairs.some((p) => !p.t)) {
      this.pushUndo();
      this.pairs = this.pairs.filter((p) => p.t);
      this.commit();
    } else {
      return;
    }
    e.preventDefault();
    e.stopPropagation();
  }

  removePair(index) {
    this.pushUndo();
    this.pairs.splice(index, 1);
    this.selected = -1;
    this.commit();
  }

  // ----- painting -----------------------------------------------------------------------------

  dab(p, erase) {
    this.line(p, p, erase);
  }

  // Paints (or erases) every pixel whose centre lies within the brush radius of the segment a-b:
  // a stroke is a union of exact capsules, with no scalloped edges.
  line(a, b, erase) {
    const w = this.imgW;
    const h = this.imgH;
    if (!this.paint) this.paint = new Uint8Array(w * h);
    if (!this.erase) this.erase = new Uint8Array(w * h);
    const r = this.brush / 2;
    const x0 = Math.max(0, Math.floor(Math.min(a[0], b[0]) - r));
    const x1 = Math.min(w - 1, Math.ceil(Math.max(a[0], b[0]) + r));
    const y0 = Math.max(0, Math.floor(Math.min(a[1], b[1]) - r));
    const y1 = Math.min(h - 1, Math.ceil(Math.max(a[1], b[1]) + r));
    if (x0 > x1 || y0 > y1) return;
    const dx = b[0] - a[0];
    const dy = b[1] - a[1];
    const len2 = dx * dx + dy * dy;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const px = x + 0.5 - a[0];
        const py = y + 0.5 - a[1];
        const t = len2 > 0 ? Math.max(0, Math.min(1, (px * dx + py * dy) / len2)) : 0;
        if ((px - t * dx) ** 2 + (py - t * dy) ** 2 > r * r) continue;
        const i = y * w + x;
        this.paint[i] = erase ? 0 : 1;
        this.erase[i] = erase ? 1 : 0;
      }
    }
    this.rebuildOverlay(x0, y0, x1, y1);
  }

  rebuildOverlay(x0 = 0, y0 = 0, x1 = this.imgW - 1, y1 = this.imgH - 1) {
    const w = this.imgW;
    const h = this.imgH;
    if (!w || !h) return;
    if (this.overlay.width !== w || this.overlay.height !== h) {
      this.overlay.width = w;
      this.overlay.height = h;
      x0 = y0 = 0;
      x1 = w - 1;
      y1 = h - 1;
    }
    const bw = x1 - x0 + 1;
    const bh = y1 - y0 + 1;
    if (bw <= 0 || bh <= 0) return;
    const ctx = this.overlay.getContext("2d");
    const img = ctx.createImageData(bw, bh);
    const px = img.data;
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        const i = y * w + x;
        const on = ((this.base && this.base[i]) || (this.paint && this.paint[i])) && !(this.erase && this.erase[i]);
        if (!on) continue;
        const o = ((y - y0) * bw + (x - x0)) * 4;
        px[o] = MASK_RGBA[0];
        px[o + 1] = MASK_RGBA[1];
        px[o + 2] = MASK_RGBA[2];
        px[o + 3] = MASK_RGBA[3];
      }
    }
    ctx.putImageData(img, x0, y0);
  }

  // ----- drawing ------------------------------------------------------------------------------

  render() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cw = c.clientWidth;
    const ch = c.clientHeight;
    if (!cw || !ch) return;
    if (c.width !== Math.round(cw * dpr) || c.height !== Math.round(ch * dpr)) {
      c.width = Math.round(cw * dpr);
      c.height = Math.round(ch * dpr);
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    if (!this.imgW) {
      ctx.fillStyle = "#888";
      ctx.font = "13px sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("No image yet", cw / 2, ch / 2 - 8);
      ctx.fillText("(Load Image shows at once; other sources after a run)", cw / 2, ch / 2 + 10);
      return;
    }
    const { scale, ox, oy } = this.layout();
    const dw = this.imgW * scale;
    const dh = this.imgH * scale;
    // Enlarged, the image shows its pixels as they are, so a click lands on a pixel one can see;
    // shrunk, it is smoothed.
    ctx.imageSmoothingEnabled = scale < 1;
    if (this.image) {
      ctx.drawImage(this.image, ox, oy, dw, dh);
    } else {
      ctx.fillStyle = "#444";
      ctx.fillRect(ox, oy, dw, dh);
    }
    ctx.save();
    ctx.globalAlpha = this.mode === "mask" ? 0.45 : 0.25;
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(this.overlay, ox, oy, dw, dh);
    ctx.restore();
    ctx.strokeStyle = "#666";
    ctx.lineWidth = 1;
    ctx.strokeRect(ox - 0.5, oy - 0.5, dw + 1, dh + 1);

    this.pairs.forEach((pair, i) => this.drawPair(ctx, pair, i));

    if (this.mode === "mask" && this.hover && this.inside(this.hover)) {
      const [hx, hy] = [ox + this.hover[0] * scale, oy + this.hover[1] * scale];
      ctx.beginPath();
      ctx.arc(hx, hy, Math.max(1, (this.brush / 2) * scale), 0, Math.PI * 2);
      ctx.strokeStyle = this.eraser ? "#fff" : "#ffb000";
      ctx.setLineDash(this.eraser ? [4, 3] : []);
      ctx.lineWidth = 1.5;
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }

  drawPair(ctx, pair, i) {
    const r = 5;
    const [hx, hy] = this.toScreen(pair.h);
    const active = this.mode === "points";
    ctx.save();
    ctx.globalAlpha = active ? 1 : 0.6;
    if (pair.t) {
      const [tx, ty] = this.toScreen(pair.t);
      const len = Math.hypot(tx - hx, ty - hy);
      if (len > r * 2) {
        const ux = (tx - hx) / len;
        const uy = (ty - hy) / len;
        const ex = tx - ux * (r + 1);
        const ey = ty - uy * (r + 1);
        for (const [color, width] of [["rgba(0,0,0,0.7)", 4], ["#fff", 2]]) {
          ctx.strokeStyle = color;
          ctx.fillStyle = color;
          ctx.lineWidth = width;
          ctx.beginPath();
          ctx.moveTo(hx + ux * r, hy + uy * r);
          ctx.lineTo(ex - ux * 6, ey - uy * 6);
          ctx.stroke();
          ctx.beginPath();
          ctx.moveTo(ex, ey);
          ctx.lineTo(ex - ux * 9 - uy * 5, ey - uy * 9 + ux * 5);
          ctx.lineTo(ex - ux * 9 + uy * 5, ey - uy * 9 - ux * 5);
          ctx.closePath();
          ctx.fill();
        }
      }
      this.drawDot(ctx, tx, ty, r, TARGET_COLOR, i === this.selected);
    }
    this.drawDot(ctx, hx, hy, r, HANDLE_COLOR, i === this.selected, !pair.t);
    ctx.font = "bold 12px sans-serif";
    ctx.textAlign = "left";
    ctx.lineWidth = 3;
    ctx.strokeStyle = "rgba(0,0,0,0.8)";
    ctx.strokeText(String(i + 1), hx + r + 2, hy - r - 1);
    ctx.fillStyle = "#fff";
    ctx.fillText(String(i + 1), hx + r + 2, hy - r - 1);
    ctx.restore();
  }

  drawDot(ctx, x, y, r, color, selected, pending) {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, Math.PI * 2);
    ctx.fillStyle = color;
    ctx.fill();
    ctx.lineWidth = selected ? 2.5 : 1.5;
    ctx.strokeStyle = selected ? "#ffeb3b" : "#fff";
    ctx.stroke();
    if (pending) {
      ctx.beginPath();
      ctx.arc(x, y, r + 4, 0, Math.PI * 2);
      ctx.setLineDash([3, 3]);
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = 1;
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }

  destroy() {
    clearInterval(this.timer);
    this.observer.disconnect();
  }
}

app.registerExtension({
  name: "DragNoise.PointEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const proto = nodeType.prototype;
    const chain = (name, after) => {
      const original = proto[name];
      proto[name] = function () {
        const r = original?.apply(this, arguments);
        after.apply(this, arguments);
        return r;
      };
    };
    chain("onExecuted", function (output) {
      this.dragnoiseEditor?.onExecuted(output);
    });
    chain("onConfigure", function () {
      // widgets_values are in place now: show the saved points and mask.
      this.dragnoiseEditor?.loadFromWidgets();
    });
    chain("onConnectionsChange", function () {
      this.dragnoiseEditor?.followSource();
    });
    chain("onResize", function () {
      this.dragnoiseEditor?.render();
    });
    chain("onRemoved", function () {
      this.dragnoiseEditor?.destroy();
    });
  },
  nodeCreated(node) {
    if (node?.comfyClass !== NODE_TYPE || node.dragnoiseEditor) return;
    if (!node.properties) node.properties = {};
    node.dragnoiseEditor = new PointEditorCanvas(node);
    node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], 500)]);
  },
});
