using System.Net;
using System.Text;
using System.Text.Json;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>The demo API as deployed (the Production environment), where ASP.NET Core's defaults differ from Development's.</summary>
public sealed class ProductionEnvironmentTests : IAsyncLifetime
{
    private ApiServer api = null!;

    public async Task InitializeAsync() =>
        api = await ApiServer.StartAsync(new Dictionary<string, string?>(FreePort.SiloEndpoints())
        {
            ["Orleans:AllowInMemoryRecords"] = "true",
            ["Demo:ApiKeys:demo-alice"] = "alice",
            ["Logging:LogLevel:Default"] = "Error",
        }, environment: "Production");

    public async Task DisposeAsync() => await api.DisposeAsync();

    [Fact]
    public async Task PaymentBodyThatCannotBeBound_IsA400Problem_StoredAndReplayedAsOne()
    {
        // A minimal API answers a body it cannot bind with an empty 400 outside Development (given its problem body by
        // the status code pages, inside the layer) and threw in Development (releasing the key): one answer now.
        using var client = api.Client();
        var key = Guid.NewGuid().ToString();

        var (first, firstBody) = await client.SendAsync("/payments", key, "{\"amount\":");
        var (replay, replayBody) = await client.SendAsync("/payments", key, "{\"amount\":");

        Assert.Equal(HttpStatusCode.BadRequest, first.StatusCode);
        Assert.Equal("application/problem+json", first.Content.Headers.ContentType?.MediaType);
        Assert.Equal(400, JsonDocument.Parse(firstBody).RootElement.GetProperty("status").GetInt32());
        Assert.True(replay.IsReplay());
        Assert.Equal(HttpStatusCode.BadRequest, replay.StatusCode);
        Assert.Equal("application/problem+json", replay.Content.Headers.ContentType?.MediaType);
        Assert.Equal(firstBody, replayBody);
    }

    [Theory]
    [InlineData("POST", "/payments", "text/plain", 415)]
    [InlineData("POST", "/nowhere", "application/json", 404)]
    [InlineData("DELETE", "/payments", "application/json", 405)]
    public async Task RequestRefusedBeforeAnyActionRuns_IsAProblem_NotABareStatus_AndClaimsNothing(string method, string path, string contentType, int status)
    {
        using var client = api.Client();
        var key = Guid.NewGuid().ToString();
        async Task<HttpResponseMessage> SendAsync()
        {
            using var request = new HttpRequestMessage(new HttpMethod(method), path) { Content = new StringContent(Requests.PaymentBody, Encoding.UTF8, contentType) };
            request.Headers.Add("Idempotency-Key", key);
            return await client.SendAsync(request);
        }

        var response = await SendAsync();
        var again = await SendAsync();

        Assert.Equal(status, (int)response.StatusCode);
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        Assert.Equal(status, JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement.GetProperty("status").GetInt32());
        Assert.False(again.IsReplay());
    }
}
