// Live refresh of the review queue: new requests appear without a reload. A form being filled in is
// left alone until it loses focus, so a refresh never eats what an approver is typing.
(function () {
  const box = document.querySelector("[data-refresh]");
  if (!box) return;
  async function refresh() {
    if (box.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
    try {
      const r = await fetch(box.dataset.refresh, { credentials: "same-origin", cache: "no-store" });
      if (r.ok) box.innerHTML = await r.text();
      else if (r.status === 401) window.location.reload();
    } catch (e) { /* the gateway restarting: try again at the next tick */ }
  }
  setInterval(refresh, 2000);
})();
