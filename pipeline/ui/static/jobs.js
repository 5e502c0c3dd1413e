// Jobs: one job's entries in the status table, and its path through the stages.
"use strict";
(() => {
  const form = document.getElementById("lookup");
  ui.live(() => {});
  if (!form) return;
  const show = async (id) => {
    ui.showError(null);
    const box = document.getElementById("job");
    try {
      const job = await ui.get(`/api/jobs/${encodeURIComponent(id)}`);
      const last = job.history[job.history.length - 1];
      document.getElementById("job-state").textContent =
        `${job.job}: ${last.state}` + (last.stage ? ` at ${last.stage} (${last.step} of ${last.steps})` : "") +
        (last.error_class ? ` · ${last.error_class}: ${last.error || ""}` : "");
      const path = document.getElementById("job-path"); path.replaceChildren();
      job.stages.forEach((name, i) => {
        const step = i + 1; let cls = "";
        if (last.state === "completed" || step < last.step) cls = "done";
        else if (step === last.step) cls = last.state === "failed" ? "failed current" : "done current";
        path.append(ui.el("li", { class: cls, "data-stage": name }, name));
      });
      const tbody = document.querySelector("#job-history tbody"); tbody.replaceChildren();
      for (const h of job.history) {
        const detail = h.error_class ? `${h.error_class}: ${h.error || ""}`
          : h.result !== null && h.result !== undefined ? JSON.stringify(h.result) : (h.replayed ? "replayed" : "");
        tbody.append(ui.el("tr", { "data-state": h.state },
          ui.el("td", {}, h.time ? new Date(h.time).toLocaleString() : "–"),
          ui.el("td", {}, h.state), ui.el("td", {}, h.stage || "(client)"),
          ui.el("td", {}, h.steps ? `${h.step} of ${h.steps}` : "–"), ui.el("td", { class: "value" }, detail)));
      }
      box.hidden = false;
    } catch (e) { box.hidden = true; ui.showError(e); }
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const id = new FormData(form).get("id").trim();
    history.replaceState(null, "", `/jobs?id=${encodeURIComponent(id)}`);
    show(id);
  });
  const initial = new URLSearchParams(location.search).get("id");
  if (initial) { form.elements.id.value = initial; show(initial); }
})();
