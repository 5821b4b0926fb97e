// The admin page's only script: the copy button beside a key shown once. Served from the package (the page's
// Content-Security-Policy allows no inline script); the page works without it.
"use strict";
document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-copy]");
  if (!button) return;
  var field = document.getElementById(button.getAttribute("data-copy"));
  var said = button.parentNode.querySelector(".copied");
  field.select();
  var done = function () { if (said) said.textContent = "Copied."; };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, function () {
      if (said) said.textContent = "Select the key and copy it.";
    });
  } else if (document.execCommand && document.execCommand("copy")) {
    done();
  } else if (said) {
    said.textContent = "Select the key and copy it.";
  }
});
