using System.Globalization;
using System.Net;
using System.Text;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Faults.Tests.Harness;

/// <summary>One demo order at a time, as alice, for scenarios that time their requests themselves.</summary>
public static class Orders
{
    public static HttpClient Client(NodeProcess api) =>
        new() { BaseAddress = api.BaseAddress, Timeout = TimeSpan.FromSeconds(60), DefaultRequestHeaders = { { "Authorization", "Bearer demo-alice" } } };

    /// <summary>POSTs an order under <paramref name="key"/>, whose action takes <paramref name="delayMs"/> more.</summary>
    public static async Task<(HttpStatusCode Status, byte[] Body, string Text)> SendAsync(HttpClient client, string key, int delayMs = 0)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "/orders")
        {
            Content = new StringContent(Workload.Body("/orders", key), Encoding.UTF8, "application/json"),
        };
        request.Headers.Add("Idempotency-Key", key);
        request.Headers.Add("X-Demo-Delay-Ms", delayMs.ToString(CultureInfo.InvariantCulture));
        using var response = await client.SendAsync(request);
        var body = await response.Content.ReadAsByteArrayAsync();
        return (response.StatusCode, body, Encoding.UTF8.GetString(body));
    }
}
