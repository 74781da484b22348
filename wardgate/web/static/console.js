// Wide tables scroll sideways in a box of their own on a narrow screen, instead of the whole page.
// The box can take keyboard focus (so it scrolls with the arrow keys) and is named for screen readers.
function boxTables(root) {
  root.querySelectorAll("table").forEach(function (t) {
    if (t.parentElement.classList.contains("scroll")) return;
    const box = document.createElement("div");
    box.className = "scroll";
    box.tabIndex = 0;
    box.setAttribute("role", "region");
    let label = t.caption ? t.caption.textContent : "";
    for (let el = t.previousElementSibling; !label && el; el = el.previousElementSibling) {
      if (/^H[1-6]$/.test(el.tagName)) label = el.textContent;
    }
    box.setAttribute("aria-label", (label || "Table").trim());
    t.parentNode.insertBefore(box, t);
    box.appendChild(t);
  });
}
boxTables(document);

// Live refresh of the review queue: new requests appear without a reload. A form being filled in is
// left alone until it loses focus, so a refresh never eats what an approver is typing.
(function () {
  const box = document.querySelector("[data-refresh]");
  if (!box) return;
  async function refresh() {
    if (box.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
    try {
      const r = await fetch(box.dataset.refresh, { credentials: "same-origin", cache: "no-store" });
      if (r.ok) { box.innerHTML = await r.text(); boxTables(box); }
      else if (r.status === 401) window.location.reload();
    } catch (e) { /* the gateway restarting: try again at the next tick */ }
  }
  setInterval(refresh, 2000);
})();

// Session replay: statements reappear with the timing they had (sped up), on a clock.
(function () {
  const box = document.querySelector("[data-replay]");
  if (!box) return;
  const start = box.querySelector("[data-replay-start]");
  const clock = box.querySelector("[data-replay-clock]");
  const items = Array.from(document.querySelectorAll("[data-timeline] [data-offset]"));
  let timers = [];
  start.addEventListener("click", function () {
    timers.forEach(clearTimeout);
    timers = [];
    const speed = Number(box.querySelector("[data-replay-speed]").value) || 1;
    items.forEach(function (el) { el.hidden = true; });
    clock.textContent = "replaying…";
    items.forEach(function (el, i) {
      const wait = Math.min(Number(el.dataset.offset) / speed, 30) * 1000;
      timers.push(setTimeout(function () {
        el.hidden = false;
        clock.textContent = "+" + Number(el.dataset.offset).toFixed(3) + " s";
        if (i === items.length - 1) clock.textContent += " · done";
      }, wait));
    });
  });
})();
