using System.Net;
using System.Text.Json;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

[Collection(EndToEndCollection.Name)]
public sealed class StoreOutageTests(EndToEndFixture fixture)
{
    [Fact]
    public async Task PostgresDown_Answers503WithRetryAfter_RunsNothing_AndServiceResumesByItself()
    {
        using var client = fixture.Api.Client();
        var key = Guid.NewGuid().ToString();
        var completedKey = Guid.NewGuid().ToString();
        var (completed, completedBody) = await client.SendAsync("/payments", completedKey, Requests.PaymentBody);
        Assert.Equal(HttpStatusCode.Created, completed.StatusCode);
        // Replayed once, so that this API process keeps the answer (a completed key's activation is gone by now).
        Assert.True((await client.SendAsync("/payments", completedKey, Requests.PaymentBody)).Response.IsReplay());

        await fixture.Servers.Postgres.StopAsync();
        try
        {
            var (response, body) = await client.SendAsync("/payments", key, Requests.PaymentBody);

            Assert.Equal(HttpStatusCode.ServiceUnavailable, response.StatusCode);
            Assert.Equal("1", response.Headers.GetValues("Retry-After").Single());
            var problem = JsonDocument.Parse(body).RootElement;
            Assert.EndsWith("/store-unavailable", problem.GetProperty("type").GetString(), StringComparison.Ordinal);
            Assert.True(problem.GetProperty("retryable").GetBoolean());

            // A key this process replayed before the outage still replays, without the store.
            var (replay, replayBody) = await client.SendAsync("/payments", completedKey, Requests.PaymentBody);
            Assert.True(replay.IsReplay());
            Assert.Equal(completedBody, replayBody);
        }
        finally
        {
            await fixture.Servers.Postgres.StartAgainAsync();
        }

        // The client retries as told; within a few attempts the layer reaches the store again.
        HttpResponseMessage? retry = null;
        for (var attempt = 0; attempt < 20 && retry?.StatusCode != HttpStatusCode.Created; attempt++)
        {
            retry = (await client.SendAsync("/payments", key, Requests.PaymentBody)).Response;
            if (retry.StatusCode != HttpStatusCode.Created)
            {
                Assert.True(retry.StatusCode is HttpStatusCode.ServiceUnavailable or HttpStatusCode.Conflict, retry.StatusCode.ToString());
                await Task.Delay(500);
            }
        }

        Assert.Equal(HttpStatusCode.Created, retry!.StatusCode);
        Assert.Equal(1, await fixture.CountAsync("demo_payments", key));
    }
}
