using System.Diagnostics.Metrics;
using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.Metrics.Testing;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>The Once API over HTTP/JSON (DESIGN §5), through Kestrel, on real PostgreSQL and Redis.</summary>
[Collection(EndToEndCollection.Name)]
public sealed class OnceApiTests(EndToEndFixture fixture)
{
    private readonly HttpClient alice = fixture.Api.Client("demo-alice");
    private readonly HttpClient bob = fixture.Api.Client("demo-bob");

    private static string NewKey() => "tool-call-" + Guid.NewGuid().ToString("N");

    [Fact]
    public async Task ClaimThenComplete_AndEveryLaterClaimGetsTheStoredResult()
    {
        var key = NewKey();

        var claim = await alice.PostAsJsonAsync($"/once/{key}/claim", new { input = "refund order 42" });
        var token = (await Json(claim)).GetProperty("token").GetString();
        var complete = await alice.PostAsJsonAsync($"/once/{key}/complete", new { token, result = new { refundId = "r-1", amount = 12.5 } });
        var again = await alice.PostAsJsonAsync($"/once/{key}/claim", new { input = "refund order 42" });
        var read = await alice.GetAsync($"/once/{key}");

        Assert.Equal(HttpStatusCode.Created, claim.StatusCode);
        Assert.Equal(HttpStatusCode.OK, complete.StatusCode);
        Assert.Equal(HttpStatusCode.OK, again.StatusCode);
        var replayed = await Json(again);
        Assert.Equal("completed", replayed.GetProperty("status").GetString());
        Assert.Equal("r-1", replayed.GetProperty("result").GetProperty("refundId").GetString());
        Assert.Equal(12.5, replayed.GetProperty("result").GetProperty("amount").GetDouble());
        Assert.Equal("completed", (await Json(read)).GetProperty("status").GetString());
    }

    [Fact]
    public async Task EachCall_IsCountedOnce_ByOperationAndHowItEnded()
    {
        using var calls = new MetricCollector<long>(fixture.Api.Services.GetRequiredService<IMeterFactory>(), "OrleansIdempotency", "idempotency.once.calls");
        var key = NewKey();
        var released = NewKey();

        var token = (await Json(await alice.PostAsJsonAsync($"/once/{key}/claim", new { input = "refund" }))).GetProperty("token").GetString();
        Assert.Equal(HttpStatusCode.Conflict, (await alice.PostAsJsonAsync($"/once/{key}/claim", new { input = "refund" })).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await alice.PostAsJsonAsync($"/once/{key}/renew", new { token })).StatusCode);
        Assert.Equal(HttpStatusCode.BadRequest, (await alice.PostAsJsonAsync($"/once/{key}/complete", new { token })).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await alice.PostAsJsonAsync($"/once/{key}/complete", new { token, result = 1 })).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await alice.PostAsJsonAsync($"/once/{key}/claim", new { input = "refund" })).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await alice.GetAsync($"/once/{key}")).StatusCode);
        var other = (await Json(await alice.PostAsJsonAsync($"/once/{released}/claim", new { }))).GetProperty("token").GetString();
        Assert.Equal(HttpStatusCode.NoContent, (await alice.PostAsJsonAsync($"/once/{released}/release", new { token = other })).StatusCode);
        Assert.Equal(HttpStatusCode.Conflict, (await alice.PostAsJsonAsync($"/once/{released}/renew", new { token = other })).StatusCode);

        var counted = calls.GetMeasurementSnapshot()
            .GroupBy(m => $"{m.Tags["operation"]} {m.Tags["result"]}").ToDictionary(g => g.Key, g => g.Sum(m => m.Value));
        Assert.Equal(new Dictionary<string, long>
        {
            ["claim acquired"] = 2,
            ["claim request-in-progress"] = 1,
            ["renew renewed"] = 1,
            ["complete request-invalid"] = 1,
            ["complete completed"] = 1,
            ["claim replayed"] = 1,
            ["read read"] = 1,
            ["release released"] = 1,
            ["renew claim-not-held"] = 1,
        }, counted);
    }

    [Fact]
    public async Task ParallelClaimsOfOneKey_ExactlyOneAcquires_TheRestAreTold409WithRetryAfter()
    {
        for (var round = 0; round < 3; round++)
        {
            var key = NewKey();
            var claims = await Task.WhenAll(Enumerable.Range(0, 20).Select(_ => Task.Run(() => alice.PostAsync($"/once/{key}/claim", null))));

            Assert.Single(claims, c => c.StatusCode == HttpStatusCode.Created);
            Assert.All(claims.Where(c => c.StatusCode != HttpStatusCode.Created), c =>
            {
                Assert.Equal(HttpStatusCode.Conflict, c.StatusCode);
                Assert.Equal("1", c.Headers.GetValues("Retry-After").Single());
            });
        }
    }

    [Fact]
    public async Task AClaimAskedAgainWithTheSameAttempt_GetsTheSameClaim()
    {
        var key = NewKey();
        var attempt = Guid.NewGuid();

        var first = await Json(await alice.PostAsJsonAsync($"/once/{key}/claim", new { attempt }));
        var lostAnswerAskedAgain = await alice.PostAsJsonAsync($"/once/{key}/claim", new { attempt });

        Assert.Equal(HttpStatusCode.Created, lostAnswerAskedAgain.StatusCode);
        Assert.Equal(first.GetProperty("token").GetString(), (await Json(lostAnswerAskedAgain)).GetProperty("token").GetString());
    }

    [Fact]
    public async Task ReleasedClaim_CanBeClaimedAgain_AndItsOldTokenCompletesNothing()
    {
        var key = NewKey();
        var oldToken = (await Json(await alice.PostAsync($"/once/{key}/claim", null))).GetProperty("token").GetString();

        var release = await alice.PostAsJsonAsync($"/once/{key}/release", new { token = oldToken });
        var reclaim = await alice.PostAsync($"/once/{key}/claim", null);
        var stale = await alice.PostAsJsonAsync($"/once/{key}/complete", new { token = oldToken, result = "late" });

        Assert.Equal(HttpStatusCode.NoContent, release.StatusCode);
        Assert.Equal(HttpStatusCode.Created, reclaim.StatusCode);
        Assert.Equal(HttpStatusCode.Conflict, stale.StatusCode);
        Assert.EndsWith("claim-not-held", (await Json(stale)).GetProperty("type").GetString());
        Assert.Equal("inProgress", (await Json(await alice.GetAsync($"/once/{key}"))).GetProperty("status").GetString());
    }

    [Fact]
    public async Task Renew_ExtendsAHeldClaim()
    {
        var key = NewKey();
        var claim = await Json(await alice.PostAsync($"/once/{key}/claim", null));
        var token = claim.GetProperty("token").GetString();
        await Task.Delay(50);

        var renew = await alice.PostAsJsonAsync($"/once/{key}/renew", new { token });

        Assert.Equal(HttpStatusCode.OK, renew.StatusCode);
        Assert.True((await Json(renew)).GetProperty("leaseExpiresAt").GetDateTimeOffset() > claim.GetProperty("leaseExpiresAt").GetDateTimeOffset());
    }

    [Fact]
    public async Task SameKeyWithAnotherInput_Is422_AndAnotherCallersKeyIsIndependent()
    {
        var key = NewKey();
        await alice.PostAsJsonAsync($"/once/{key}/claim", new { input = "a" });

        var reused = await alice.PostAsJsonAsync($"/once/{key}/claim", new { input = "b" });
        var bobs = await bob.PostAsJsonAsync($"/once/{key}/claim", new { input = "b" });

        Assert.Equal(HttpStatusCode.UnprocessableEntity, reused.StatusCode);
        Assert.EndsWith("key-reused", (await Json(reused)).GetProperty("type").GetString());
        Assert.Equal(HttpStatusCode.Created, bobs.StatusCode);
    }

    [Theory]
    [InlineData("complete", "{\"token\":\"not-a-token\",\"result\":1}")]
    [InlineData("complete", "{\"result\":1}")]
    [InlineData("release", "[1,2]")]
    [InlineData("release", "{\"token\":")]
    [InlineData("claim", "{\"attempt\":\"not-a-guid\"}")]
    public async Task MalformedCalls_Are400Problems_AndChangeNothing(string call, string body)
    {
        var key = NewKey();

        var response = await alice.PostAsync($"/once/{key}/{call}", new StringContent(body, System.Text.Encoding.UTF8, "application/json"));

        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        Assert.Equal("none", (await Json(await alice.GetAsync($"/once/{key}"))).GetProperty("status").GetString());
    }

    [Fact]
    public async Task CompletionWithoutAResult_Is400_AndTheClaimIsStillHeld()
    {
        var key = NewKey();
        var token = (await Json(await alice.PostAsync($"/once/{key}/claim", null))).GetProperty("token").GetString();

        var response = await alice.PostAsJsonAsync($"/once/{key}/complete", new { token });

        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Equal("inProgress", (await Json(await alice.GetAsync($"/once/{key}"))).GetProperty("status").GetString());
    }

    [Fact]
    public async Task CompletionWhoseResultNoJsonWriterCanWrite_Is400_AndTheClaimIsStillHeld()
    {
        // Valid JSON text, but its string escapes half a surrogate pair: no UTF-8 holds it.
        var key = NewKey();
        var token = (await Json(await alice.PostAsync($"/once/{key}/claim", null))).GetProperty("token").GetString();

        var response = await alice.PostAsync($"/once/{key}/complete",
            new StringContent($"{{\"token\":\"{token}\",\"result\":\"\\ud800\"}}", System.Text.Encoding.UTF8, "application/json"));

        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        Assert.Equal("inProgress", (await Json(await alice.GetAsync($"/once/{key}"))).GetProperty("status").GetString());
    }

    [Fact]
    public async Task KeysThatDifferInAnEncodedSlash_AreTwoKeys_EachFoundAgainAsSent()
    {
        // The key k/b goes as k%2Fb, the key k%2Fb as k%252Fb: Kestrel's path reads k%2Fb for both.
        var id = NewKey();
        var slash = id + "/b";
        var escaped = id + "%2Fb";

        var first = await alice.PostAsJsonAsync($"/once/{Uri.EscapeDataString(slash)}/claim", new { input = "a" });
        var second = await alice.PostAsJsonAsync($"/once/{Uri.EscapeDataString(escaped)}/claim", new { input = "b" });
        var token = (await Json(second)).GetProperty("token").GetString();
        var completed = await alice.PostAsJsonAsync($"/once/{Uri.EscapeDataString(escaped)}/complete", new { token, result = 2 });

        Assert.Equal(HttpStatusCode.Created, first.StatusCode);
        Assert.Equal(HttpStatusCode.Created, second.StatusCode);
        Assert.Equal(HttpStatusCode.OK, completed.StatusCode);
        Assert.Equal("inProgress", (await Json(await alice.GetAsync($"/once/{Uri.EscapeDataString(slash)}"))).GetProperty("status").GetString());
        Assert.Equal("completed", (await Json(await alice.GetAsync($"/once/{Uri.EscapeDataString(escaped)}"))).GetProperty("status").GetString());

        // A target in absolute form (a proxy's), with a query and a trailing slash, names the same key.
        var absolute = await RawHttp.SendAsync(fixture.Api.BaseAddress, "GET", $"{fixture.Api.BaseAddress.GetLeftPart(UriPartial.Authority)}/once/{Uri.EscapeDataString(escaped)}/?x=1",
            [("Authorization", "Bearer demo-alice")], []);
        Assert.Equal(200, absolute.Status);
        Assert.Equal("completed", JsonDocument.Parse(absolute.Body).RootElement.GetProperty("status").GetString());
    }

    [Fact]
    public async Task Unauthenticated_Is401()
    {
        using var anonymous = fixture.Api.Client(apiKey: null);

        var response = await anonymous.PostAsync($"/once/{NewKey()}/claim", null);

        Assert.Equal(HttpStatusCode.Unauthorized, response.StatusCode);
    }

    private static async Task<JsonElement> Json(HttpResponseMessage response) =>
        JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement;
}
