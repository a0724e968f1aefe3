// The invitation link carries its token in the URL fragment, which no request ever sends: keep it
// in this tab's sessionStorage (it survives signing in on the way), drop it from the address bar,
// and fill the accept form, which posts it in the request body.
(function () {
  const KEY = "invitationToken";
  const fromLink = window.location.hash.slice(1);
  if (fromLink) {
    sessionStorage.setItem(KEY, fromLink);
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  const form = document.querySelector("form[data-invitation-accept]");
  if (!form) return;
  const field = form.querySelector("input[name=token]");
  const token = sessionStorage.getItem(KEY);
  if (token && !field.value) field.value = token;
  form.addEventListener("submit", function () { sessionStorage.removeItem(KEY); });
})();
