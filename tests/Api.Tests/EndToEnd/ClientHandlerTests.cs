using System.Net;
using System.Net.Http.Headers;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Http.Resilience;
using OrleansIdempotency.Client;
using Polly;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>DESIGN §5's client: <see cref="IdempotencyKeyHandler"/> in an <c>IHttpClientFactory</c> client, against the demo API over real HTTP.</summary>
[Collection(EndToEndCollection.Name)]
public sealed class ClientHandlerTests(EndToEndFixture fixture)
{
    [Fact]
    public async Task EveryRetryOfALogicalRequestCarriesItsKey_SoALostResponseIsReplayed_AndTheNextRequestGetsANewKey()
    {
        var seen = new SeenByTheServer(loseFirstResponse: true);
        using var services = Services(seen);
        var client = services.GetRequiredService<IHttpClientFactory>().CreateClient("api");

        // The first attempt's order is made, its response lost; the resilience handler sends the request again.
        using var first = await client.PostAsync("/orders", Json(Requests.OrderBody));
        using var second = await client.PostAsync("/orders", Json(Requests.OrderBody));

        Assert.Equal(HttpStatusCode.Created, first.StatusCode);
        Assert.True(first.IsReplay());
        Assert.Equal(HttpStatusCode.Created, second.StatusCode);
        Assert.False(second.IsReplay());
        Assert.Equal(3, seen.Keys.Count);
        Assert.Equal(seen.Keys[0], seen.Keys[1]);
        Assert.NotEqual(seen.Keys[0], seen.Keys[2]);
        Assert.Equal(1, await fixture.CountAsync("demo_orders", seen.Keys[0]!));
        Assert.Equal(1, await fixture.CountAsync("demo_orders", seen.Keys[2]!));
    }

    [Fact]
    public async Task ARequestFoundInProgress_IsSentAgainAfterRetryAfter_UntilItsOutcomeReplays()
    {
        var key = Guid.NewGuid().ToString();
        using var alice = fixture.Api.Client();
        // Payments reject a concurrent duplicate at once: 409 with Retry-After.
        var running = alice.SendAsync("/payments", key, Requests.PaymentBody, ("X-Demo-Delay-Ms", "4000"));
        await fixture.WaitUntilInProgressAsync(key);

        var seenByPatient = new SeenByTheServer(loseFirstResponse: false);
        using var patient = Services(seenByPatient);
        using var impatient = Services(new SeenByTheServer(loseFirstResponse: false), new IdempotencyKeyOptions { InProgressWait = TimeSpan.Zero });
        using var refused = await impatient.GetRequiredService<IHttpClientFactory>().CreateClient("api").SendAsync(Payment(key));
        using var waited = await patient.GetRequiredService<IHttpClientFactory>().CreateClient("api").SendAsync(Payment(key));

        Assert.Equal(HttpStatusCode.Conflict, refused.StatusCode);
        Assert.NotNull(refused.Headers.RetryAfter);
        Assert.Equal(HttpStatusCode.Created, (await running).Response.StatusCode);
        Assert.Equal(HttpStatusCode.Created, waited.StatusCode);
        Assert.True(waited.IsReplay());
        // Refused while the first ran, then sent again, as the same request, until the outcome replayed.
        Assert.True(seenByPatient.Keys.Count >= 2, $"the patient client sent {seenByPatient.Keys.Count} attempt(s)");
        Assert.All(seenByPatient.Keys, k => Assert.Equal(key, k));
        Assert.Equal(1, await fixture.CountAsync("demo_payments", key));
    }

    [Fact]
    public async Task OtherMethods_AndRequestsThatBringTheirOwnKey_AreLeftAsTheyAre()
    {
        var seen = new SeenByTheServer(loseFirstResponse: false);
        using var services = Services(seen);
        var client = services.GetRequiredService<IHttpClientFactory>().CreateClient("api");
        var own = Guid.NewGuid().ToString();

        using var list = await client.GetAsync("/orders");
        using var keyed = await client.SendAsync(Requests.Post("/orders", own, Requests.OrderBody));

        Assert.Equal(HttpStatusCode.OK, list.StatusCode);
        Assert.Equal(HttpStatusCode.Created, keyed.StatusCode);
        Assert.Equal([null, own], seen.Keys);
    }

    private ServiceProvider Services(SeenByTheServer seen, IdempotencyKeyOptions? options = null)
    {
        var services = new ServiceCollection();
        // Outermost first: the key handler, then the retries, then what the server sees of each attempt.
        var client = services.AddHttpClient("api", client =>
            {
                client.BaseAddress = fixture.Api.BaseAddress;
                client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", "demo-alice");
            })
            .AddIdempotencyKeys(options);
        client.AddResilienceHandler("retry", pipeline => pipeline.AddRetry(new HttpRetryStrategyOptions
        {
            MaxRetryAttempts = 3,
            Delay = TimeSpan.FromMilliseconds(20),
            BackoffType = DelayBackoffType.Constant,
        }));
        client.AddHttpMessageHandler(() => seen);
        return services.BuildServiceProvider();
    }

    private static HttpRequestMessage Payment(string key) => Requests.Post("/payments", key, Requests.PaymentBody);

    private static StringContent Json(string body) => new(body, System.Text.Encoding.UTF8, "application/json");

    /// <summary>Records the key of every attempt that reaches the server; optionally loses the first response, as a dropped connection does.</summary>
    private sealed class SeenByTheServer(bool loseFirstResponse) : DelegatingHandler
    {
        public List<string?> Keys { get; } = [];

        protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            Keys.Add(request.Headers.TryGetValues(IdempotencyKeyHandler.HeaderName, out var values) ? values.Single() : null);
            var response = await base.SendAsync(request, cancellationToken);
            if (loseFirstResponse && Keys.Count == 1)
            {
                response.Dispose();
                throw new HttpRequestException("The response was lost on its way back (test).");
            }

            return response;
        }
    }
}
