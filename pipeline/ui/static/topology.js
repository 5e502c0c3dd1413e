// The topology page: the graph laid out by dagre, drawn as SVG, coloured by the live status.
"use strict";
(async () => {
  const SVG = "http://www.w3.org/2000/svg";
  const svg = document.getElementById("graph");
  const tbody = document.querySelector("#stages tbody");
  let topo;
  try { topo = await ui.get("/api/topology"); } catch (e) { ui.showError(e); return; }
  const stages = topo.nodes.filter((n) => n.kind === "stage");
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: "TB", nodesep: 18, ranksep: 34, marginx: 10, marginy: 10 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const n of topo.nodes) {
    const w = n.kind === "stage" ? 200 : Math.max(120, n.label.length * 7 + 20);
    g.setNode(n.id, { width: w, height: n.kind === "stage" ? 62 : 30, data: n });
  }
  for (const e of topo.edges) g.setEdge(e.from, e.to, { kind: e.kind });
  dagre.layout(g);
  const size = g.graph();
  // Scaled to the box's width (never above 1:1), so a long chain fits without scrolling.
  svg.setAttribute("viewBox", `0 0 ${size.width} ${size.height}`);
  svg.style.width = `min(100%, ${size.width}px)`;
  svg.style.aspectRatio = `${size.width} / ${size.height}`;
  const make = (tag, attrs, parent) => {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    parent.appendChild(node);
    return node;
  };
  const defs = make("defs", {}, svg);
  const marker = make("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
  make("path", { d: "M0,0 L10,5 L0,10 z", fill: "#667085" }, marker);
  for (const e of g.edges()) {
    const edge = g.edge(e);
    const d = edge.points.map((p, i) => `${i ? "L" : "M"}${p.x},${p.y}`).join(" ");
    make("path", { d, class: `edge ${edge.kind}`, "marker-end": "url(#arrow)" }, svg);
  }
  const metrics = {};
  for (const id of g.nodes()) {
    const box = g.node(id); const n = box.data;
    let parent = svg;
    if (n.kind === "stage") {
      parent = make("a", { href: ui.stageLink(n.stage, n.lane, n.pipeline) }, svg);
    } else if (n.kind === "dlq") {
      const owner = stages.find((s) => s.dlq === n.topic);
      if (owner) parent = make("a", { href: ui.stageLink(owner.stage, owner.lane, owner.pipeline) }, svg);
    }
    const grp = make("g", { class: `node ${n.kind}${n.kind === "stage" ? " stopped" : ""}`,
      "data-id": n.id, "data-label": n.label,
      transform: `translate(${box.x - box.width / 2},${box.y - box.height / 2})` }, parent);
    make("rect", { width: box.width, height: box.height, rx: n.kind === "stage" ? 8 : 4 }, grp);
    const title = make("text", { x: 10, y: n.kind === "stage" ? 20 : 19, class: "title" }, grp);
    title.textContent = n.label;
    if (n.kind !== "stage") title.removeAttribute("class");
    if (n.kind === "stage") {
      const line1 = make("text", { x: 10, y: 37, class: "metrics", "data-metric": "rates" }, grp);
      const line2 = make("text", { x: 10, y: 53, class: "metrics", "data-metric": "lag" }, grp);
      line1.textContent = "in – /s · out – /s"; line2.textContent = "lag – · 0 instances";
      metrics[n.id] = { grp, line1, line2 };
    }
  }
  const rows = {};
  for (const n of stages) {
    const link = ui.el("a", { href: ui.stageLink(n.stage, n.lane, n.pipeline) }, n.label);
    const tr = ui.el("tr", { "data-id": n.id }, ui.el("td", {}, link));
    const cells = {};
    for (const k of ["health", "instances", "in_per_s", "out_per_s", "lag", "dead_letters"]) {
      cells[k] = ui.el("td", { class: k === "health" ? "health" : "num", "data-k": k }, "–");
      tr.append(cells[k]);
    }
    tbody.append(tr); rows[n.id] = cells;
  }
  ui.live((snap) => {
    ui.showError(snap.error && snap.error !== "starting" ? `status: ${snap.error}` : null);
    for (const [id, s] of Object.entries(snap.stages || {})) {
      const m = metrics[id]; const cells = rows[id];
      if (!m) continue;
      m.grp.setAttribute("class", `node stage ${s.health}`);
      m.line1.textContent = `in ${ui.fmt(s.in_per_s)}/s · out ${ui.fmt(s.out_per_s)}/s`;
      m.line2.textContent = `lag ${ui.fmt(s.lag)} · ${s.instances} instance${s.instances === 1 ? "" : "s"}` +
        (s.dead_letters ? ` · ${ui.fmt(s.dead_letters)} dlq` : "");
      cells.health.textContent = s.health; cells.health.className = `health ${s.health}`;
      for (const k of ["instances", "in_per_s", "out_per_s", "lag", "dead_letters"]) cells[k].textContent = ui.fmt(s[k]);
    }
  });
})();
