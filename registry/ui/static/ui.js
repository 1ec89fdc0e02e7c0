// lora-registry UI: the little a server-rendered page needs. No framework, nothing inline
// (the pages' Content-Security-Policy allows only scripts from this server).
//  - [data-refresh]: fetch that URL every 1.5 s and swap it in, until it says data-finished
//    (then [data-while-running] elements, e.g. a cancel button, go away).
//  - [data-copy]: copy the named field's text to the clipboard.
//  - [data-back]: go back in history (the link works without script too).
"use strict";

function refresh(box) {
  const url = box.getAttribute("data-refresh");
  const tick = async () => {
    try {
      const answer = await fetch(url, { headers: { Accept: "text/html" }, credentials: "same-origin" });
      if (answer.ok) {
        box.innerHTML = await answer.text();
        if (box.querySelector("[data-finished]")) {
          box.removeAttribute("data-refresh");
          document.querySelectorAll("[data-while-running]").forEach((element) => element.remove());
          return;
        }
      } else if (answer.status === 401 || answer.redirected) {
        return;  // signed out: the next reload goes to the sign-in page
      }
    } catch (error) {
      // the server is restarting or the network dropped: try again on the next tick
    }
    window.setTimeout(tick, 1500);
  };
  window.setTimeout(tick, 1500);
}

function copy(button) {
  const field = document.querySelector(button.getAttribute("data-copy"));
  if (!field) return;
  field.select();
  const done = () => { button.textContent = "Copied"; window.setTimeout(() => { button.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, () => {});
  } else {
    done();  // selected: Ctrl+C copies it
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(refresh);
  document.addEventListener("click", (event) => {
    const target = event.target instanceof Element ? event.target : null;
    if (!target) return;
    const copier = target.closest("[data-copy]");
    if (copier) { copy(copier); return; }
    const back = target.closest("[data-back]");
    if (back && window.history.length > 1) { event.preventDefault(); window.history.back(); }
  });
});
