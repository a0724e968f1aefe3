// Uploads with a progress bar: a form with data-upload-url posts its file to the API (session
// cookie + CSRF header) and shows progress, then goes to the new version's page.
(function () {
  function csrfToken() {
    const match = document.cookie.match(/(?:^|; )csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function bindUpload(form) {
    if (form.dataset.bound) return;
    form.dataset.bound = "1";
    const bar = form.querySelector("progress");
    const status = form.querySelector("[data-upload-status]");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      const file = form.querySelector("input[type=file]").files[0];
      if (!file) { status.textContent = "Choose a file first."; return; }
      const body = new FormData(form);
      body.delete("csrfmiddlewaretoken");
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.dataset.uploadUrl);
      xhr.setRequestHeader("X-CSRFToken", csrfToken());
      xhr.upload.addEventListener("progress", function (e) {
        if (!e.lengthComputable) return;
        bar.value = Math.round((e.loaded / e.total) * 100);
        status.textContent = bar.value < 100 ? "Uploading… " + bar.value + "%" : "Checking the data…";
      });
      xhr.addEventListener("load", function () {
        let reply = {};
        try { reply = JSON.parse(xhr.responseText); } catch (e) { /* not JSON: show the status */ }
        if (xhr.status === 201) {
          status.textContent = "Done: version " + reply.number + ".";
          // The page renders the URL of version 0; the new version's number replaces it.
          window.location.href = form.dataset.successUrl.replace(/\/0\/$/, "/" + reply.number + "/");
        } else {
          bar.value = 0;
          status.textContent = reply.detail || ("Upload failed (HTTP " + xhr.status + "). Try again.");
        }
      });
      xhr.addEventListener("error", function () {
        status.textContent = "The connection failed during the upload. Check your network and try again.";
      });
      bar.hidden = false;
      bar.value = 0;
      status.textContent = "Uploading…";
      xhr.send(body);
    });
  }

  function bindAll() { document.querySelectorAll("form[data-upload-url]").forEach(bindUpload); }
  document.addEventListener("DOMContentLoaded", bindAll);
  document.addEventListener("htmx:afterSettle", bindAll);
})();

// The job form's cost estimate: price per GPU-second x GPUs x max runtime, as the user types.
// The server gives the same figure in the submit response (estimated_max_cost).
(function () {
  function bindEstimate(out) {
    if (out.dataset.bound) return;
    out.dataset.bound = "1";
    const form = out.closest("form");
    const prices = JSON.parse(document.getElementById(out.dataset.pricesId).textContent);
    function update() {
      const price = prices[form.elements.resource_class.value];
      const gpus = Number(form.elements.gpu_count.value);
      const seconds = Number(form.elements.max_runtime_s.value);
      if (price === undefined || !(gpus > 0) || !(seconds > 0)) {
        out.textContent = "choose a resource class, GPUs and a max runtime";
        return;
      }
      out.textContent = "$" + (Number(price) * gpus * seconds).toFixed(2);
    }
    form.addEventListener("input", update);
    form.addEventListener("change", update);
    update();
  }

  function bindAll() { document.querySelectorAll("output[data-prices-id]").forEach(bindEstimate); }
  document.addEventListener("DOMContentLoaded", bindAll);
  document.addEventListener("htmx:afterSettle", bindAll);
})();
