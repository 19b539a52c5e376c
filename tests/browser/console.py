"""The web console in a real browser (Debian's chromium, headless, driven
over WebDriver by chromedriver), as an administrator uses it: log in by
keyboard, find an account and see what a conflict lost, settle a
dispute, dry-run a pass then confirm it, filter the journal, log out.

    console.py BASE_URL SCREENSHOT_DIR USER PASSWORD DISPUTED CANDIDATE

Every page is checked for labelled controls; each step saves a
screenshot. Prints one line per step; exits non-zero on the first
failure, with the page's text.
"""

import os
import sys

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

base, shots, user, password, disputed, candidate = sys.argv[1:7]
os.makedirs(shots, exist_ok=True)

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
    options.add_argument(flag)
# The driver from Debian's package: nothing is downloaded.
browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
# A page being replaced loses its elements under a check: look again.
wait = WebDriverWait(browser, 20, ignored_exceptions=[NoSuchElementException, StaleElementReferenceException])
step = 0


def shot(name):
    global step
    step += 1
    path = os.path.join(shots, f"{step:02d}-{name}.png")
    browser.save_screenshot(path)
    print(f"{step:02d} {name}: {browser.title}", flush=True)


def fail(message):
    body = browser.find_element(By.TAG_NAME, "body").text
    sys.exit(f"{message}\n--- page {browser.current_url} ---\n{body}")


def heading():
    return browser.find_element(By.TAG_NAME, "h1").text


def expect_heading(text):
    """Waits for the page whose heading is `text`: after a click, the page
    before it may still be there for a moment."""
    try:
        wait.until(lambda b: any(h.text == text for h in b.find_elements(By.TAG_NAME, "h1")))
    except TimeoutException:
        fail(f"expected the page {text!r}, got {heading()!r}")


def labelled():
    """Every visible control has a label that names it."""
    for control in browser.find_elements(By.CSS_SELECTOR, "input, select"):
        kind = control.get_attribute("type")
        if kind == "hidden":
            continue
        ident = control.get_attribute("id")
        if not ident or not browser.find_elements(By.CSS_SELECTOR, f"label[for='{ident}']"):
            fail(f"a {kind or 'select'} control ({control.get_attribute('name')}) has no label")


def submit(button_text):
    for button in browser.find_elements(By.CSS_SELECTOR, "button[type=submit]"):
        if button.text == button_text:
            button.click()
            return
    fail(f"no button {button_text!r}")


try:
    # Not logged in: the console sends the browser to its login page.
    browser.get(base + "/console")
    expect_heading("Log in")
    labelled()
    shot("login")
    # By keyboard alone: the name field has the focus.
    focused = browser.switch_to.active_element
    if focused.get_attribute("id") != "username":
        fail("the user name field does not have the focus")
    focused.send_keys(user, Keys.TAB)
    browser.switch_to.active_element.send_keys(password, Keys.ENTER)
    expect_heading("Dashboard")
    labelled()
    attention = browser.find_element(By.ID, "attention").find_element(By.XPATH, "..").text
    if "dispute" not in attention:
        fail("the dashboard does not show the dispute needing attention")
    shot("dashboard")

    # Find an account and see what its conflict lost.
    browser.find_element(By.LINK_TEXT, "Objects").click()
    expect_heading("Objects")
    labelled()
    search = browser.find_element(By.ID, "q")
    search.send_keys("ali", Keys.ENTER)
    wait.until(lambda b: b.find_elements(By.LINK_TEXT, "alice"))
    shot("search")
    browser.find_element(By.LINK_TEXT, "alice").click()
    expect_heading("account alice")
    history = browser.find_element(By.ID, "history").find_element(By.XPATH, "..").text
    if "conflict-resolved" not in history or "(lost)" not in history:
        fail("alice's history does not show the conflict and its lost values")
    if "Local, directory" not in browser.page_source:
        fail("alice's page has no local/directory/baseline comparison")
    shot("account-history")

    # Settle the dispute: choose the entry, confirm, link.
    browser.find_element(By.LINK_TEXT, "Disputes").click()
    expect_heading("Disputes")
    labelled()
    if disputed not in browser.find_element(By.TAG_NAME, "main").text:
        fail(f"the dispute about {disputed} is not listed")
    shot("disputes")
    browser.find_element(By.CSS_SELECTOR, f"input[type=radio][value='{candidate}']").click()
    browser.find_element(By.CSS_SELECTOR, "input[name=confirm]").click()
    submit("Link")
    expect_heading("Linked")
    if candidate not in browser.find_element(By.TAG_NAME, "main").text:
        fail("the link page does not name the entry")
    shot("linked")

    # A dry run, then the pass it plans, confirmed.
    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    expect_heading("Dashboard")
    browser.find_element(By.LINK_TEXT, "example").click()
    expect_heading("Connector example")
    shot("connector")
    submit("Dry run")
    expect_heading("Dry run of example")
    labelled()
    if "nothing was changed" not in browser.find_element(By.TAG_NAME, "main").text:
        fail("the dry run page does not say it changed nothing")
    shot("dry-run")
    submit("Run the pass")
    # Unconfirmed, the browser itself refuses (the box is required): the
    # form is not sent, and the box says why.
    message = browser.find_element(By.ID, "confirm").get_attribute("validationMessage")
    if not message:
        fail("the pass's form was sent without its confirmation")
    expect_heading("Dry run of example")
    browser.find_element(By.ID, "confirm").click()
    submit("Run the pass")
    expect_heading("Pass of example")
    shot("pass")

    # The journal, filtered.
    browser.find_element(By.LINK_TEXT, "Journal").click()
    expect_heading("Journal")
    labelled()
    browser.find_element(By.CSS_SELECTOR, "#action option[value='linked']").click()
    submit("Filter")
    # The filtered page has the same heading: wait for its address.
    try:
        wait.until(lambda b: "action=linked" in b.current_url)
    except TimeoutException:
        fail("the journal's filter was not applied")
    expect_heading("Journal")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.journal > tbody > tr")
    if not rows or any("linked" not in row.text for row in rows):
        fail("the journal filtered by 'linked' shows other lines, or none")
    if "console:" + user not in rows[0].text:
        fail("the link is not journaled with its operator")
    shot("journal")

    submit("Log out")
    expect_heading("Log in")
    browser.get(base + "/console/disputes")
    expect_heading("Log in")
    shot("logged-out")
except WebDriverException as e:
    fail(f"WebDriver: {e}")
finally:
    browser.quit()
print("ok")
